"""Issuing first-party token pairs with the claims the revocation check relies on."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask_jwt_extended import create_access_token, create_refresh_token

from service import metrics
from service.ids import new_id


@dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token, its refresh token and the access token's lifetime."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_jti: str

    def as_json(self) -> dict[str, object]:
        """The login/refresh response body."""
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        }


def issue_pair(
    *,
    user_id: str,
    username: str,
    sid: str,
    refresh_jti: str,
    session_expires: int,
    access_ttl: int,
    scope: str,
) -> TokenPair:
    """Sign a new access and refresh token for one session.

    Every token carries sid (the session, a UUIDv7 whose timestamp dates the login) and the
    session's end; the refresh token expires with the session, the access token earlier.
    """
    now = int(time.time())
    access_exp = min(now + access_ttl, session_expires)
    access = create_access_token(
        identity=user_id,
        additional_claims={
            "jti": new_id(),
            "sid": sid,
            "sxp": session_expires,
            "name": username,
            "scope": scope,
            "exp": access_exp,
        },
    )
    refresh = create_refresh_token(
        identity=user_id,
        additional_claims={"jti": refresh_jti, "sid": sid, "exp": session_expires},
    )
    metrics.tokens_issued("access", "refresh")
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        expires_in=access_exp - now,
        refresh_jti=refresh_jti,
    )

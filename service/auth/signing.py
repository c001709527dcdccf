"""First-party signing keys: the one that signs, the earlier ones that still verify, by kid."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

# First-party kids carry this prefix; OAuth kids are 43-character JWK thumbprints.
KID_PREFIX = "fp-"
# What an HS256 kid is an HMAC of: it names the secret without revealing anything of it.
KID_LABEL = b"authsvc first-party key id"


@dataclass(frozen=True)
class FirstPartyKeys:
    """The keys of first-party tokens: kid of the signing key, and every key that verifies."""

    algorithm: str
    kid: str
    verifying: dict[str, str]
    # Tokens issued before first-party tokens carried a kid were signed with the oldest
    # key still listed: the secret that was current when they were issued.
    unnamed: str

    @classmethod
    def hs256(cls, secrets: list[str]) -> FirstPartyKeys:
        """The current secret first, then the earlier ones still accepted."""
        return cls._named("HS256", secrets, secret_kid)

    @classmethod
    def asymmetric(cls, algorithm: str, public_pems: list[str]) -> FirstPartyKeys:
        """RS256 or ES256: the signing key's public half first, then earlier ones, by kid."""
        return cls._named(algorithm, public_pems, public_kid)

    @classmethod
    def _named(
        cls, algorithm: str, keys: list[str], kid_of: Callable[[str], str]
    ) -> FirstPartyKeys:
        kids = [kid_of(key) for key in keys]
        return cls(algorithm, kids[0], dict(zip(kids, keys, strict=True)), keys[-1])

    def verifying_key(self, kid: str | None) -> str | None:
        """The key a first-party token with this kid (None: none) verifies under, if any."""
        return self.unnamed if kid is None else self.verifying.get(kid)

    def is_earlier(self, kid: str | None) -> bool:
        """Whether a first-party token with this kid verifies under a fallback key only."""
        key = self.verifying_key(kid)
        return key is not None and key != self.verifying[self.kid]


def secret_kid(secret: str) -> str:
    """The kid of an HS256 secret."""
    digest = hmac.new(secret.encode(), KID_LABEL, hashlib.sha256).hexdigest()
    return KID_PREFIX + digest[:16]


def public_kid(public_pem: str) -> str:
    """The kid of a public key: a digest of its DER form, whatever the PEM's layout."""
    key = serialization.load_pem_public_key(public_pem.encode())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KID_PREFIX + hashlib.sha256(der).hexdigest()[:16]

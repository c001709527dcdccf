"""Failed sign-ins, counted per account and per address: guessing meets a 429 early.

Three counters, each living THROTTLE_WINDOW seconds from its first failure:

- one account from one address (LOGIN_FAILURES_PER_PAIR, the strict one): a guesser in
  one place, or the owner's typos; a successful sign-in clears it;
- one account from every address that has not signed in to it within
  LOGIN_KNOWN_ADDRESS_TTL (LOGIN_FAILURES_PER_ACCOUNT): guessing spread over addresses.
  Addresses the owner signed in from are exempt, so nobody locks the owner out from
  elsewhere;
- one address, any accounts (LOGIN_FAILURES_PER_ADDRESS): one password sprayed over many.

A username is counted the same whether an account has it or not, and the 429 reads the
same whichever counter refused. A correct password is refused too while a counter is past
its limit, also when concurrent failures got it there during the hashing, so the limit
holds however many guesses arrive at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable

from service.addresses import address_group
from service.config import Settings
from service.errors import ApiError, ServiceUnavailable
from service.events import audit
from service.store.throttle import Attempt, Counter, Throttle, ThrottleUnavailable
from service.store.users import username_key

REFUSED = "Too many failed sign-in attempts; retry after the time given in Retry-After."
UNCOUNTED = "Sign-in attempts cannot be counted right now; retry shortly."


class TooManyAttempts(ApiError):
    """429: a failure counter of this attempt is past its limit."""

    def __init__(self, wait: float) -> None:
        self.retry_after = max(1, math.ceil(wait))
        super().__init__(429, REFUSED, headers={"Retry-After": str(self.retry_after)})


def sign_in(*, settings: Settings, username: str, address: str) -> Attempt:
    """The counters a sign-in as username from address meets."""
    account, group = username_key(username), address_group(address)
    return Attempt(
        kind="login",
        counters=(
            Counter(
                "pair", (account, group), settings.login_failures_per_pair, cleared_by_success=True
            ),
            Counter(
                "account", (account,), settings.login_failures_per_account, exempt_if_known=True
            ),
            Counter("address", (group,), settings.login_failures_per_address),
        ),
        window=settings.throttle_window,
        known=(account, group),
        known_ttl=settings.login_known_address_ttl,
    )


async def check(*, throttle: Throttle, attempt: Attempt) -> None:
    """Refuse (429) before any password work when a counter is past its limit."""
    _refuse_if(await _counted(throttle.check(attempt)))


async def failed(*, throttle: Throttle, attempt: Attempt) -> None:
    """Count a wrong password or unknown username."""
    await _counted(throttle.fail(attempt))


async def succeeded(*, throttle: Throttle, attempt: Attempt) -> None:
    """Accept a correct password unless a limit was reached meanwhile; clears the pair."""
    _refuse_if(await _counted(throttle.succeed(attempt)))


async def _counted(call: Awaitable[float]) -> float:
    try:
        return await call
    except ThrottleUnavailable:
        # Fail closed: uncounted, guesses would be unlimited; and while Redis is away
        # every token check answers 503 anyway, so a sign-in would buy nothing usable.
        raise ServiceUnavailable(UNCOUNTED, 2) from None


def _refuse_if(wait: float) -> None:
    if wait > 0:
        audit("login_throttled", retry_after=max(1, math.ceil(wait)))
        raise TooManyAttempts(wait)

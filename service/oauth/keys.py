"""The keyring of access-token signing keys: stored encrypted, rotated, cached per process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import ECAlgorithm
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import ServiceUnavailable
from service.events import audit
from service.store import Store
from service.store import oauth_keys as key_store
from service.store.models import utcnow
from service.store.oauth_models import SigningKey

ALG = "ES256"
# Every worker rereads the keys at least this often (in the background, never waiting).
RELOAD_SECONDS = 60.0
# Reload attempts (an unknown kid, a failing database) start at most this often.
MISS_RELOAD_SECONDS = 1.0
# A signer rereads a copy older than this before signing, so that it sees retirements.
SIGNER_RELOAD_SECONDS = 5.0
# It starts that reread in the background this long before, so that no request waits for it.
SIGNER_REFRESH_AHEAD_SECONDS = 1.0
# `keys retire` takes effect this far ahead: every worker has reread the keys by then.
RETIRE_DELAY_SECONDS = RELOAD_SECONDS + 10.0
# How long a request without a usable key waits for a reload.
RELOAD_WAIT_SECONDS = 10.0
SEALED_ELSEWHERE = "SECRET_KEY differs from the one that sealed the stored signing keys"
# A wrong SECRET_KEY is mended by a redeployment, not by retrying within the second.
SEALED_RETRY_AFTER = 30

log = logging.getLogger(__name__)


class SigningKeysSealedElsewhere(ServiceUnavailable):
    """No key may sign here: the stored ones were sealed with another SECRET_KEY."""

    def __init__(self) -> None:
        super().__init__(
            "Access tokens cannot be signed right now; retry later.", SEALED_RETRY_AFTER
        )


@dataclass(frozen=True, slots=True)
class Key:
    """One stored signing key, decrypted (or its public half alone: see sealed)."""

    kid: str
    alg: str
    public_jwk: dict[str, Any]
    public_key: ec.EllipticCurvePublicKey
    private_key: ec.EllipticCurvePrivateKey | None  # None: sealed with another SECRET_KEY
    activates_at: datetime
    retired_at: datetime | None

    @property
    def sealed(self) -> bool:
        """Whether only the public half could be read (the private one needs another SECRET_KEY)."""
        return self.private_key is None

    def signs_at(self, now: datetime) -> bool:
        """Whether this key may sign at now (a retirement may be scheduled ahead)."""
        if self.sealed or now < self.activates_at:
            return False
        return self.retired_at is None or now < self.retired_at

    def published_at(self, now: datetime, token_ttl: int) -> bool:
        """Whether tokens it signed may still be alive at now.

        A worker whose copy predates the retirement may sign for one more reload interval.
        """
        if self.retired_at is None:
            return True
        return self.retired_at + timedelta(seconds=RELOAD_SECONDS + token_ttl) > now


def key_cipher(*secret_keys: str) -> MultiFernet:
    """The cipher of private keys at rest: Fernet keyed by HKDF(SECRET_KEY).

    It seals with the first secret and unseals with any of them (SECRET_KEY_FALLBACKS):
    changing SECRET_KEY without keeping the old one there makes stored keys unreadable.
    """
    return MultiFernet([_fernet(secret_key) for secret_key in secret_keys])


def _fernet(secret_key: str) -> Fernet:
    """One secret's cipher."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"authsvc oauth signing keys"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a kid that is stable and derived from the key itself."""
    members = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(members.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_signing_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    """A P-256 key and its public JWK, kid included, that no command line takes for an option."""
    while True:
        private = ec.generate_private_key(ec.SECP256R1())
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        kid = thumbprint(jwk)
        if not kid.startswith("-"):  # 1 in 64 would: `keys retire -x...` fails
            jwk.update(kid=kid, alg=ALG, use="sig")
            return private, jwk


async def create_key(
    session: AsyncSession, *, secret_key: str, activates_at: datetime | None = None
) -> str:
    """Generate, encrypt and store a new key; returns its kid."""
    private, jwk = new_signing_key()
    kid = str(jwk["kid"])
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    await key_store.add_key(
        session,
        kid=kid,
        alg=ALG,
        private_key=key_cipher(secret_key).encrypt(pem).decode(),
        public_jwk=jwk,
        activates_at=activates_at or utcnow(),
    )
    audit("key_rotated", kid=kid, activates_at=(activates_at or utcnow()).isoformat())
    return kid


async def ensure_active_key(session: AsyncSession, *, secret_key: str) -> bool:
    """Create a key when none will sign on (a fresh install, or every key retired or retiring).

    A replacement for keys retiring ahead of time starts signing when they stop: it is
    published by every worker in the meantime. Returns whether a key was created.
    """
    if await key_store.has_active_key(session):
        return False
    await key_store.lock_key_creation(session)
    if await key_store.has_active_key(session):
        return False
    takes_over = await key_store.last_retirement_due(session)
    await create_key(session, secret_key=secret_key, activates_at=takes_over)
    return True


async def sealed_elsewhere_in_use(
    session: AsyncSession, *, secret_keys: Sequence[str]
) -> list[str]:
    """The kids of keys not retired whose private half none of secret_keys can unseal."""
    cipher = key_cipher(*secret_keys)
    sealed = []
    for row in await key_store.list_keys(session):
        if row.retired_at is not None:
            continue
        try:
            cipher.decrypt(row.private_key.encode())
        except InvalidToken:
            sealed.append(row.kid)
    return sealed


async def reseal_keys(
    session: AsyncSession, *, secret_keys: Sequence[str]
) -> tuple[int, list[str]]:
    """Seal every stored key with the first of secret_keys, unsealing with any of them.

    Returns how many keys changed, and the kids none of them unseals; if there are any,
    nothing changes.
    """
    current, cipher = key_cipher(secret_keys[0]), key_cipher(*secret_keys)
    resealed: list[tuple[SigningKey, bytes]] = []
    unreadable = []
    for row in await key_store.list_keys(session):
        sealed = row.private_key.encode()
        try:
            current.decrypt(sealed)
            continue
        except InvalidToken:
            pass
        try:
            resealed.append((row, cipher.rotate(sealed)))
        except InvalidToken:
            unreadable.append(row.kid)
    if unreadable:
        return 0, unreadable
    for row, token in resealed:
        row.private_key = token.decode()
    if resealed:
        audit("keys_resealed", kids=" ".join(row.kid for row, _ in resealed))
    return len(resealed), []


def decrypt_key(row: SigningKey, fernet: MultiFernet) -> Key:
    """Load a stored key; only its public half when fernet cannot unseal it (another SECRET_KEY)."""
    try:
        pem = fernet.decrypt(row.private_key.encode())
    except InvalidToken:
        public = ECAlgorithm.from_jwk(dict(row.public_jwk))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        private = None
    else:
        loaded = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        private, public = loaded, loaded.public_key()
    return Key(
        kid=row.kid,
        alg=row.alg,
        public_jwk=dict(row.public_jwk),
        public_key=public,
        private_key=private,
        activates_at=row.activates_at,
        retired_at=row.retired_at,
    )


class Keyring:
    """This process's copy of the keys, loaded at worker start and reread in the background.

    Token checks never wait for the database: an unknown kid only schedules a reload, and
    its token is refused.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cipher = key_cipher(*store.settings.secret_keys)
        self._token_ttl = store.settings.access_token_ttl
        self._keys: list[Key] = []
        self._sealed = 0  # how many of the keys last read this process cannot unseal
        self._loaded_at = -math.inf
        self._attempted_at = -math.inf
        self._lock = threading.Lock()
        self._pending: Future[None] | None = None

    async def load(self) -> None:
        """Read every key from the database, creating the first one if needed."""
        secret_key = self._store.settings.secret_key or ""
        async with self._store.db.session() as session:
            loaded = self._decrypt(await key_store.list_keys(session))
            # No new key beside ones sealed with another SECRET_KEY: their owners could not
            # read it.
            unsealed = not any(key.sealed for key in loaded)
            if unsealed and await ensure_active_key(session, secret_key=secret_key):
                loaded = self._decrypt(await key_store.list_keys(session))
        self._note_sealed(sum(key.sealed for key in loaded), len(loaded))
        self._keys = loaded
        self._loaded_at = time.monotonic()

    def _decrypt(self, rows: Sequence[SigningKey]) -> list[Key]:
        return [decrypt_key(row, self._cipher) for row in rows]

    def _note_sealed(self, sealed: int, stored: int) -> None:
        """Log when keys this process cannot unseal appear, and when none is left."""
        if sealed > self._sealed:
            log.error(
                "cannot unseal %d of %d stored OAuth signing keys: %s; they verify tokens "
                "but sign none here",
                sealed,
                stored,
                SEALED_ELSEWHERE,
            )
        elif self._sealed and not sealed:
            log.info("every stored OAuth signing key can be unsealed again")
        self._sealed = sealed

    async def _load_logged(self) -> None:
        try:
            await self.load()
        except Exception:
            log.exception("signing keys not reloaded; keeping the previous copy")

    def _schedule_reload(self) -> Future[None] | None:
        """Start a background reload unless one runs or one was attempted just now."""
        with self._lock:
            running = self._pending is not None and not self._pending.done()
            now = time.monotonic()
            if not running and now - self._attempted_at >= MISS_RELOAD_SECONDS:
                self._attempted_at = now
                self._pending = self._store.loop.submit(self._load_logged())
            return self._pending

    def _refresh(self, max_age: float = RELOAD_SECONDS) -> None:
        if time.monotonic() - self._loaded_at >= max_age:
            self._schedule_reload()

    def _await_reload(self) -> None:
        """Wait for a reload where waiting is allowed (see WorkerLoop.can_wait)."""
        pending = self._schedule_reload()
        loop = self._store.loop
        if pending is None or not loop.can_wait():
            return
        with contextlib.suppress(Exception):
            loop.run(_finished(pending), timeout=RELOAD_WAIT_SECONDS)

    def _published(self) -> list[Key]:
        now = utcnow()
        return [key for key in self._keys if key.published_at(now, self._token_ttl)]

    def _signer(self) -> Key | None:
        now = utcnow()
        return next((key for key in self._keys if key.signs_at(now)), None)

    def signing_key(self) -> Key:
        """The newest key allowed to sign now."""
        age = time.monotonic() - self._loaded_at
        if age >= SIGNER_RELOAD_SECONDS or self._signer() is None:
            # Signing waits for a reread, so that a retirement is seen in time (and a first
            # key made).
            if not self._store.loop.can_wait():
                raise RuntimeError("the signing keys need a reread: here nothing may wait")
            self._await_reload()
        elif age >= SIGNER_RELOAD_SECONDS - SIGNER_REFRESH_AHEAD_SECONDS:
            self._schedule_reload()
        key = self._signer()
        if key is None:
            if self._sealed:
                raise SigningKeysSealedElsewhere()
            raise RuntimeError("no signing key is active")
        return key

    def sealed_elsewhere(self) -> bool:
        """Whether no key may sign here because the stored ones need another SECRET_KEY.

        While so, each call rereads the keys in the background, so that a repair shows.
        """
        if not self._sealed:
            return False
        self._refresh(max_age=MISS_RELOAD_SECONDS)
        return self._signer() is None

    def verification_key(self, kid: str) -> Key | None:
        """The published key with this kid, or None (and a reload scheduled) at once."""
        self._refresh()
        for key in self._published():
            if key.kid == kid:
                return key
        self._schedule_reload()
        return None

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK set of every key whose tokens may still be alive."""
        self._refresh()
        if not self._keys:
            self._await_reload()
        return {"keys": [key.public_jwk for key in self._published()]}


async def _finished(pending: Future[None]) -> None:
    """Wait for a reload started on the loop."""
    await asyncio.wrap_future(pending)

"""The keyring of access-token signing keys: stored encrypted, rotated, cached per process."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import ECAlgorithm
from sqlalchemy.ext.asyncio import AsyncSession

from service.store import Store
from service.store import oauth_keys as key_store
from service.store.models import utcnow
from service.store.oauth_models import SigningKey

ALG = "ES256"
RELOAD_SECONDS = 60.0
# An unknown kid triggers a reload, but at most this often, so junk tokens cannot hammer PG.
MISS_RELOAD_SECONDS = 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Key:
    """One decrypted signing key."""

    kid: str
    alg: str
    public_jwk: dict[str, Any]
    public_key: ec.EllipticCurvePublicKey
    private_key: ec.EllipticCurvePrivateKey
    activates_at: datetime
    retired_at: datetime | None

    def signs_at(self, now: datetime) -> bool:
        """Whether this key may sign at now."""
        return self.activates_at <= now and self.retired_at is None

    def published_at(self, now: datetime, token_ttl: int) -> bool:
        """Whether tokens it signed may still be alive at now."""
        return self.retired_at is None or self.retired_at + timedelta(seconds=token_ttl) > now


def key_cipher(secret_key: str) -> Fernet:
    """The cipher of private keys at rest: Fernet keyed by HKDF(SECRET_KEY).

    Changing SECRET_KEY therefore makes stored keys unreadable: rotate signing keys first.
    """
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"authsvc oauth signing keys"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a kid that is stable and derived from the key itself."""
    members = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(members.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def create_key(
    session: AsyncSession, *, secret_key: str, activates_at: datetime | None = None
) -> str:
    """Generate, encrypt and store a new key; returns its kid."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    kid = _thumbprint(jwk)
    jwk.update(kid=kid, alg=ALG, use="sig")
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
    return kid


async def ensure_active_key(session: AsyncSession, *, secret_key: str) -> None:
    """Create a first key when none can sign (a fresh install, or every key retired)."""
    if await key_store.has_active_key(session):
        return
    await key_store.lock_key_creation(session)
    if not await key_store.has_active_key(session):
        await create_key(session, secret_key=secret_key)


def decrypt_key(row: SigningKey, fernet: Fernet) -> Key:
    """Load a stored key."""
    private = serialization.load_pem_private_key(
        fernet.decrypt(row.private_key.encode()), password=None
    )
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return Key(
        kid=row.kid,
        alg=row.alg,
        public_jwk=dict(row.public_jwk),
        public_key=private.public_key(),
        private_key=private,
        activates_at=row.activates_at,
        retired_at=row.retired_at,
    )


class Keyring:
    """This process's copy of the keys, reloaded every minute or on an unknown kid.

    Token checks may run on the server's event loop (see service.hotpath), so only the
    first load and a rate-limited unknown-kid reload wait; the periodic one runs behind.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cipher = key_cipher(store.settings.secret_key or "")
        self._token_ttl = store.settings.access_token_ttl
        self._keys: list[Key] = []
        self._loaded_at = 0.0
        self._lock = threading.Lock()
        self._pending: Future[None] | None = None

    async def load(self) -> None:
        """Read every key from the database, creating the first one if needed."""
        async with self._store.db.session() as session:
            await ensure_active_key(session, secret_key=self._store.settings.secret_key or "")
            rows = await key_store.list_keys(session)
        self._keys = [decrypt_key(row, self._cipher) for row in rows]
        self._loaded_at = time.monotonic()

    async def _load_logged(self) -> None:
        try:
            await self.load()
        except Exception:
            log.exception("signing keys not reloaded; keeping the previous copy")

    def _refresh(self) -> None:
        if not self._keys:
            self._reload_if_older(0)
        elif time.monotonic() - self._loaded_at >= RELOAD_SECONDS:
            with self._lock:
                if self._pending is None or self._pending.done():
                    self._pending = self._store.loop.submit(self._load_logged())

    def _reload_if_older(self, seconds: float) -> None:
        if time.monotonic() - self._loaded_at < seconds or self._store.loop.in_loop_thread():
            return
        with self._lock:
            if time.monotonic() - self._loaded_at >= seconds:
                self._store.loop.run(self.load(), timeout=10)

    def _published(self) -> list[Key]:
        now = utcnow()
        return [key for key in self._keys if key.published_at(now, self._token_ttl)]

    def signing_key(self) -> Key:
        """The newest key allowed to sign now."""
        self._refresh()
        for attempt in range(2):
            now = utcnow()
            for key in self._keys:
                if key.signs_at(now):
                    return key
            if attempt == 0:
                self._reload_if_older(0)
        raise RuntimeError("no signing key is active")

    def verification_key(self, kid: str) -> Key | None:
        """The published key with this kid, or None."""
        self._refresh()
        for attempt in range(2):
            for key in self._published():
                if key.kid == kid:
                    return key
            if attempt == 0:
                self._reload_if_older(MISS_RELOAD_SECONDS)
        return None

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK set of every key whose tokens may still be alive."""
        self._refresh()
        return {"keys": [key.public_jwk for key in self._published()]}

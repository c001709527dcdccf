"""TLS: the server context's key-exchange groups, and development's self-signed certificate."""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import ipaddress
import logging
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.config import Config

from service.config import ConfigError, read_file
from service.transport.penalty_box import Policy

log = logging.getLogger(__name__)

# Mozilla's "intermediate" configuration: X25519, P-256, P-384, in that order of preference.
GROUPS = "X25519:P-256:P-384"
SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL's ssl.h; SSL_CTX_set1_groups_list is a macro over it
_warned = False


def check_certificate(cert_file: Path, key_file: Path) -> None:
    """Refuse, naming the file and why, a certificate or key the server could not load."""
    try:
        cert = read_file("TLS_CERT_FILE", cert_file)
        key = read_file("TLS_KEY_FILE", key_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise ConfigError(f"TLS_CERT_FILE {cert_file}: no PEM certificate in it") from None
    try:
        serialization.load_pem_private_key(key, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"TLS_KEY_FILE {key_file}: not an unencrypted PEM private key") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"TLS_CERT_FILE {cert_file} and TLS_KEY_FILE {key_file} do not go together "
            f"({exc.reason or exc})"
        ) from None


def ensure_dev_certificate(directory: Path) -> tuple[Path, Path]:
    """Return (cert, key) paths in directory, creating a self-signed pair if absent."""
    cert_path, key_path = directory / "dev-cert.pem", directory / "dev-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authsvc development")])
    now = dt.datetime.now(dt.UTC)
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class TlsConfig(Config):
    """Hypercorn's configuration, whose TLS context offers only the groups in GROUPS.

    It also carries to each worker the HTTP/2 abuse penalty (service/transport/penalty_box.py).
    """

    penalty_policy: Policy | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context: ssl.SSLContext | None = super().create_ssl_context()
        if context is not None:
            restrict_groups(context)
        return context


def restrict_groups(context: ssl.SSLContext, groups: str = GROUPS) -> bool:
    """Offer only groups for key exchange; False, after one warning, where that cannot be done.

    Python 3.11's ssl module cannot set them (CPython adds SSLContext.set_groups later), so
    libssl's own SSL_CTX_set1_groups_list is called on the context's SSL_CTX, after checking
    that the pointer read from the object is that context's (libssl reports its options).
    """
    set_groups = getattr(context, "set_groups", None)
    try:
        if callable(set_groups):
            set_groups(groups)
            return True
        _set_groups_through_libssl(context, groups)
        return True
    except (OSError, AttributeError, ValueError, ssl.SSLError) as exc:
        # One warning per process (each worker builds its own context), not per context.
        global _warned
        if not _warned:
            _warned = True
            log.warning("TLS key-exchange groups left at OpenSSL's defaults: %s", exc)
        return False


def _set_groups_through_libssl(context: ssl.SSLContext, groups: str) -> None:
    import _ssl

    if sys.implementation.name != "cpython" or not isinstance(context, _ssl._SSLContext):
        raise ValueError("not CPython's SSLContext")
    # CPython's context object is PyObject_HEAD followed by its SSL_CTX pointer.
    offset = object.__basicsize__
    if _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        raise ValueError("unexpected SSLContext layout")
    pointer = ctypes.c_void_p.from_address(id(context) + offset).value
    libssl = _libssl(_ssl.__file__)
    if not pointer or libssl.SSL_CTX_get_options(pointer) != int(context.options):
        raise ValueError("unexpected SSLContext layout")
    if libssl.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise ValueError(f"libssl refused the groups {groups}")


@functools.cache
def _libssl(module_path: str) -> ctypes.CDLL:
    """The libssl that the ssl module itself is linked against (found through _ssl)."""
    library = ctypes.CDLL(module_path)
    library.SSL_CTX_get_options.restype = ctypes.c_uint64
    library.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    library.SSL_CTX_ctrl.restype = ctypes.c_long
    library.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    return library

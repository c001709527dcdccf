"""Email addresses: what an account may give (RFC 5321 and 5322, ASCII only)."""

from __future__ import annotations

import re

MAX_LENGTH = 254  # RFC 5321 4.5.3.1.3: a path of 256 octets, less its angle brackets
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_LABEL = 63

# RFC 5322 3.2.3 dot-atom: atext runs joined by single dots. Quoted local parts are legal
# but almost never meant, and easy to misread; they are refused.
LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def normalize_email(value: str) -> str:
    """The address as stored (domain lower-cased), or ValueError saying what is wrong."""
    if len(value) > MAX_LENGTH:
        raise ValueError(f"an email address has at most {MAX_LENGTH} characters")
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("an email address is printable ASCII without spaces")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("an email address is local-part@domain")
    if len(local) > MAX_LOCAL or not LOCAL_PART.fullmatch(local):
        raise ValueError(
            f"the part before @ is at most {MAX_LOCAL} characters: letters, digits, "
            "!#$%&'*+/=?^_`{|}~- and single dots between them"
        )
    labels = domain.split(".")
    if (
        len(labels) < 2
        or any(len(label) > MAX_LABEL or not LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError("the part after @ is a domain name such as example.com")
    return f"{local}@{domain.lower()}"

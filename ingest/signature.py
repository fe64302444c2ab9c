"""Chargify webhook signatures: lowercase hex HMAC-SHA256 of the raw body, keyed by the
site shared key (WEBHOOKS.md §2.1). Verified over the raw bytes, before any decoding."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def sign(key: bytes, body: bytes) -> str:
    """The signature Chargify sends for ``body`` under ``key``."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(keys: Iterable[bytes], body: bytes, provided: str | bytes | None) -> bool:
    """True when ``provided`` is the signature of ``body`` under any of ``keys``.

    Several keys are accepted so a shared key can be rotated without downtime. Every key
    is tried (no early exit) and compared in constant time.
    """
    if not provided:
        return False
    if isinstance(provided, str):
        try:
            provided = provided.strip().lower().encode("ascii")
        except UnicodeEncodeError:
            return False
    else:
        provided = provided.strip().lower()
    ok = False
    for key in keys:
        expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode("ascii")
        ok |= hmac.compare_digest(expected, provided)
    return ok

"""Chargify webhook signatures: lowercase hex HMAC-SHA256 of the raw body, keyed by the
site shared key (WEBHOOKS.md §2.1). Verified over the raw bytes, before any decoding."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["sign", "verify"]

_HEX_DIGEST_LENGTH = 2 * hashlib.sha256().digest_size


def sign(key: bytes, body: bytes) -> str:
    """The signature Chargify sends for ``body`` under ``key``."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _digest(provided: str | bytes) -> bytes | None:
    """The 32 bytes a hex signature stands for, or None if it is not 64 hex digits."""
    if isinstance(provided, bytes):
        try:
            provided = provided.decode("ascii")
        except UnicodeDecodeError:
            return None
    provided = provided.strip()
    if len(provided) != _HEX_DIGEST_LENGTH:
        return None
    try:
        # fromhex accepts either letter case; Chargify sends lowercase.
        return bytes.fromhex(provided)
    except ValueError:
        return None


def verify(keys: Iterable[bytes], body: bytes, *provided: str | bytes | None) -> bool:
    """True when one of ``provided`` is the signature of ``body`` under one of ``keys``.

    Several keys are accepted so a shared key can be rotated without downtime, and several
    candidates because Chargify may send the signature both as the header and as the
    ``signature_hmac_sha_256`` query parameter. Every key is tried against every
    candidate (no early exit) and each comparison is constant-time, so the answer's timing
    does not tell which key, or how much of a signature, matched.
    """
    digests = [d for d in map(_digest, (p for p in provided if p)) if d is not None]
    if not digests:
        return False
    ok = False
    for key in keys:
        expected = hmac.digest(key, body, "sha256")
        for digest in digests:
            ok |= hmac.compare_digest(expected, digest)
    return ok

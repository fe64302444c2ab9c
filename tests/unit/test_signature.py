"""Chargify signatures: the documented example, rotation, and what must never verify."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from chargify_stream.ingest.signature import sign, verify

DOCS_KEY = b"123"
DOCS_BODY = b"payload[chargify]=testing&event=test"
DOCS_SIGNATURE = "19826d51b9f866b26eda1f154de192593360f8d0bcb63df8a28540a5dcf733f1"


def test_documented_example() -> None:
    assert sign(DOCS_KEY, DOCS_BODY) == DOCS_SIGNATURE
    assert verify([DOCS_KEY], DOCS_BODY, DOCS_SIGNATURE)


def test_is_over_the_raw_bytes_not_the_decoded_form() -> None:
    encoded = b"id=1&event=test&memo=a%20b"
    decoded = b"id=1&event=test&memo=a b"
    assert not verify([DOCS_KEY], decoded, sign(DOCS_KEY, encoded))


def test_any_configured_key_verifies() -> None:
    keys = [b"old", b"new"]
    assert verify(keys, DOCS_BODY, sign(b"old", DOCS_BODY))
    assert verify(keys, DOCS_BODY, sign(b"new", DOCS_BODY))
    assert not verify(keys, DOCS_BODY, sign(b"other", DOCS_BODY))


def test_any_candidate_verifies() -> None:
    good = sign(DOCS_KEY, DOCS_BODY)
    assert verify([DOCS_KEY], DOCS_BODY, "0" * 64, good)
    assert verify([DOCS_KEY], DOCS_BODY, None, good)
    assert not verify([DOCS_KEY], DOCS_BODY, None, None)


def test_accepts_bytes_surrounding_space_and_uppercase() -> None:
    assert verify([DOCS_KEY], DOCS_BODY, DOCS_SIGNATURE.encode())
    assert verify([DOCS_KEY], DOCS_BODY, f" {DOCS_SIGNATURE.upper()}\t")


def test_refuses_what_is_not_a_hex_sha256() -> None:
    for provided in (
        None,
        "",
        b"",
        DOCS_SIGNATURE[:-1],
        DOCS_SIGNATURE + "0",
        DOCS_SIGNATURE[:-1] + "g",
        "é" * 64,
        b"\xff" * 64,
        hashlib.md5(DOCS_KEY + DOCS_BODY).hexdigest(),  # the legacy MD5 signature
    ):
        assert not verify([DOCS_KEY], DOCS_BODY, provided), provided


def test_no_keys_verify_nothing() -> None:
    assert not verify([], DOCS_BODY, DOCS_SIGNATURE)


@given(st.binary(max_size=64), st.binary(max_size=512), st.text(max_size=80))
def test_only_the_true_signature_verifies(key: bytes, body: bytes, other: str) -> None:
    true = hmac.new(key, body, hashlib.sha256).hexdigest()
    assert verify([key], body, true)
    assert verify([key], body, other) == (other.strip().lower() == true)

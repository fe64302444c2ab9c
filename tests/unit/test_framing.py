"""Framing: the id, event and key read from a body without decoding the whole form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargify_stream.ingest.framing import Frame, FramingError, frame
from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.form import parse_pairs
from tests.builders import build_body
from tests.samples import raw_form_params, sample_body


def test_reads_id_event_and_subscription() -> None:
    body = build_body("payment_success", webhook_id=3_100_000_001, subscription_id=15100141)
    assert frame(body) == Frame("3100000001", "payment_success", "15100141")
    assert frame(body).key == b"15100141"


def test_refund_keys_on_the_flat_or_nested_subscription_id() -> None:
    legacy = build_body("refund_success", subscription_id=42)
    nested = build_body("refund_success", subscription_id=43, refund_shape="2023")
    assert frame(legacy).key == b"42"
    assert frame(nested).key == b"43"


def test_key_falls_back_to_the_webhook_id() -> None:
    assert frame(b"id=9&event=customer_update&payload[customer][id]=1").key == b"9"
    # An empty or non-numeric subscription id is no key.
    assert frame(b"id=9&event=x&payload[subscription][id]=").key == b"9"
    assert frame(b"id=9&event=x&payload[subscription][id]=abc&payload[subscription_id]=5").key == (
        b"5"
    )


def test_field_order_does_not_matter_and_first_occurrence_wins() -> None:
    assert frame(b"payload[subscription][id]=7&event=e&id=1&id=2") == Frame("1", "e", "7")


def test_names_must_match_whole_keys() -> None:
    body = b"xid=1&event=e&payload[subscription][id]x=5&xpayload[subscription][id]=6"
    with pytest.raises(FramingError) as err:
        frame(body)
    assert err.value.reason == "no_id"
    assert frame(body + b"&id=2").key == b"2"


def test_values_are_percent_decoded() -> None:
    assert frame(b"id=%31%32&event=payment%5Fsuccess") == Frame("12", "payment_success", None)


def test_test_event_with_and_without_id() -> None:
    assert frame(b"id=123456&event=test&payload[chargify]=testing").key == b"123456"
    legacy = frame(b"payload[chargify]=testing&event=test")
    assert legacy == Frame(None, "test", None)
    assert legacy.key is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "no_event"),
        (b"id=1", "no_event"),
        (b"id=1&event=", "no_event"),
        (b"id=1&event=a%20b", "no_event"),
        (b"id=1&event=" + b"e" * 101, "no_event"),
        (b"id=1&event=caf%C3%A9", "no_event"),
        (b"event=payment_success", "no_id"),
        (b"id=&event=e", "no_id"),
        (b"id=-1&event=e", "no_id"),
        (b"id=1.0&event=e", "no_id"),
        (b"id=9223372036854775808&event=e", "no_id"),
        (b"id=%D9%A1&event=e", "no_id"),  # an Arabic-Indic digit is not an id
        (b"id=1&event=e&x=\xff", "not_utf8"),
        (b"id=1&event=e&x=%", "bad_escape"),
        (b"id=1&event=e&x=%4", "bad_escape"),
        (b"id=1&event=e&x=%zz", "bad_escape"),
        (b"id=1&event=e&x=%C3%28", "bad_escape"),
        (b"id=1&event=e&x=%FF", "bad_escape"),
    ],
)
def test_refusals(body: bytes, reason: str) -> None:
    with pytest.raises(FramingError) as err:
        frame(body)
    assert err.value.reason == reason


def test_largest_bigint_is_an_id() -> None:
    assert frame(b"id=9223372036854775807&event=e").webhook_id == "9223372036854775807"


@pytest.mark.parametrize("name", raw_form_params())
def test_every_raw_sample_frames_like_the_full_decoder_reads_it(name: str) -> None:
    body = sample_body(name)
    pairs = parse_pairs(body)
    first = {}
    for key, value in pairs:
        first.setdefault(key, value)
    fr = frame(body)
    assert fr.event == first["event"]
    assert fr.webhook_id == first.get("id")
    subscription = first.get("payload[subscription][id]") or first.get("payload[subscription_id]")
    assert fr.subscription_id == subscription


@given(st.binary(max_size=300))
def test_accepts_only_what_the_full_decoder_can_read(body: bytes) -> None:
    """Whatever the gateway accepts, the processor's decoder can read (no dead letter)."""
    try:
        frame(body)
    except FramingError:
        return
    try:
        parse_pairs(body)
    except MalformedPayload as exc:  # pragma: no cover - the failure this test looks for
        pytest.fail(f"framed but undecodable: {exc}")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["id", "event", "payload[subscription][id]", "x", "payload[a]"]),
            st.text(alphabet="0123456789abc_%+é", max_size=12),
        ),
        max_size=8,
    )
)
def test_agrees_with_the_full_decoder_on_form_bodies(pairs: list[tuple[str, str]]) -> None:
    body = "&".join(f"{k}={v}" for k, v in pairs).encode()
    try:
        fr = frame(body)
    except FramingError:
        return
    decoded = parse_pairs(body)
    first: dict[str, str] = {}
    for key, value in decoded:
        first.setdefault(key, value)
    assert fr.event == first["event"]
    if fr.webhook_id is not None:
        assert fr.webhook_id == first["id"]

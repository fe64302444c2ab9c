"""The customer relay's one pure step: an outbox row as the record it publishes."""

from __future__ import annotations

from chargify_stream.schemas.codec import decode_record
from chargify_stream.sink.customer_relay import record_of
from tests.unit.test_codec import CUSTOMER


def test_an_outbox_row_is_a_keyed_customer_or_a_tombstone() -> None:
    c = CUSTOMER
    key, value = record_of((7, c.customer_key, False, c.partner_key, c.email, c.name, c.updated_at))
    assert key == c.customer_key.encode() and value is not None
    assert decode_record(value) == CUSTOMER
    deleted = (8, c.customer_key, True, None, None, None, c.updated_at)
    assert record_of(deleted) == (c.customer_key.encode(), None)

"""Routing decisions for built bodies of every supported event, every dead-letter and
ignore reason, and the real captured bodies; and the targeted field extraction, with its
scan in C and in Python, held to what a full decode gives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargify_stream.processors import fields, routing
from chargify_stream.processors.fields import FIELDS, extract_fields
from chargify_stream.processors.routing import (
    TEST_EVENT,
    TEST_PANEL,
    UNSUPPORTED_EVENT,
    DeadLetter,
    Decision,
    Emit,
    Ignore,
    route,
)
from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.form import decode_form, encode_pairs
from chargify_stream.schemas.records import ComponentAllocation, SubscriptionChange, Transaction
from tests.builders import DEFAULT_OCCURRED_AT, EVENTS, build_body, build_pairs
from tests.samples import (
    raw_form_names,
    raw_form_params,
    raw_form_samples,
    require_samples,
    sample_body,
)

AT = datetime(2024, 3, 10, 6, 59, 58, tzinfo=UTC)


def no_lookup(subscription_id: int) -> str | None:
    return None


class Lookup:
    """A lookup_reference that records its calls."""

    def __init__(self, table: dict[int, str]) -> None:
        self.table = table
        self.calls: list[int] = []

    def __call__(self, subscription_id: int) -> str | None:
        self.calls.append(subscription_id)
        return self.table.get(subscription_id)


def emitted(decision: Decision) -> Emit:
    assert isinstance(decision.action, Emit), decision.action
    return decision.action


def dead_letter(decision: Decision) -> DeadLetter:
    assert isinstance(decision.action, DeadLetter), decision.action
    return decision.action


class TestPaymentSuccess:
    def test_emits_a_payment(self) -> None:
        body = build_body(
            "payment_success",
            webhook_id=2566279204,
            event_id=4834010965,
            subscription_id=15100141,
            reference="cust-1",
            transaction_id=161537369,
            amount_cents=6400,
            currency="AUD",
            memo="Renewal: $10 (11/08)",
            occurred_at=AT,
        )
        decision = route(body, no_lookup)
        assert decision == Decision(
            webhook_id=2566279204,
            event="payment_success",
            action=Emit(
                "transactions",
                "cust-1",
                Transaction(
                    transaction_id=161537369,
                    kind="payment",
                    amount_cents=6400,
                    currency="AUD",
                    customer_reference="cust-1",
                    subscription_id=15100141,
                    memo="Renewal: $10 (11/08)",
                    occurred_at=AT,
                    webhook_id=2566279204,
                    event_id=4834010965,
                    event="payment_success",
                    site_id=31615,
                    site_subdomain="general-goods",
                ),
            ),
            learn=(15100141, "cust-1"),
        )

    def test_subscription_id_falls_back_to_the_transaction(self) -> None:
        body = build_body("payment_success", subscription_id=42, drop=["payload[subscription][id]"])
        record = emitted(route(body, no_lookup)).record
        assert isinstance(record, Transaction) and record.subscription_id == 42

    def test_no_currency_no_event_id(self) -> None:
        body = build_body("payment_success", currency=None, event_id=None, transaction_id=5)
        record = emitted(route(body, no_lookup)).record
        assert isinstance(record, Transaction)
        assert (record.currency, record.event_id, record.transaction_id) == (None, None, 5)

    def test_the_subscription_reference_is_not_the_customer_reference(self) -> None:
        body = build_body(
            "payment_success",
            reference="cust-1",
            overrides={"payload[subscription][reference]": "sub-ref"},
        )
        assert emitted(route(body, no_lookup)).key == "cust-1"


class TestRefundSuccess:
    @pytest.mark.parametrize("shape", ["legacy", "2023"])
    def test_emits_a_negative_transaction(self, shape: str) -> None:
        body = build_body(
            "refund_success",
            webhook_id=29381989,
            event_id=99,
            refund_id=3,
            amount_cents=100,
            payment_id=161537369,
            subscription_id=15100141,
            reference="johnd",
            refund_shape=shape,
            occurred_at="2013-11-27 00:59:35 UTC",
            memo="A refund for overcharge.",
        )
        decision = route(body, no_lookup)
        action = emitted(decision)
        assert (action.topic, action.key) == ("transactions", "johnd")
        assert action.record == Transaction(
            transaction_id=3,
            kind="refund",
            amount_cents=-100,
            customer_reference="johnd",
            subscription_id=15100141,
            refunded_payment_id=161537369,
            memo="A refund for overcharge.",
            occurred_at=datetime(2013, 11, 27, 0, 59, 35, tzinfo=UTC),
            webhook_id=29381989,
            event_id=99,
            event="refund_success",
            site_id=31615,
            site_subdomain="general-goods",
        )
        assert decision.learn == (15100141, "johnd")

    def test_a_negative_amount_stays_negative(self) -> None:
        body = build_body("refund_success", amount_cents=-250)
        record = emitted(route(body, no_lookup)).record
        assert isinstance(record, Transaction) and record.amount_cents == -250

    def test_iso_timestamp(self) -> None:
        body = build_body("refund_success", occurred_at="2015-01-24T12:16:46Z")
        record = emitted(route(body, no_lookup)).record
        assert record.occurred_at == datetime(2015, 1, 24, 12, 16, 46, tzinfo=UTC)


class TestSubscriptionEvents:
    @pytest.mark.parametrize(
        "event", ["signup_success", "subscription_state_change", "subscription_product_change"]
    )
    def test_emits_the_state_after_the_event(self, event: str) -> None:
        body = build_body(
            event,
            webhook_id=77,
            event_id=88,
            subscription_id=2**40,
            reference="cust-2",
            state="on_hold",
            previous_state="active",
            product_id=6,
            product_handle="pro",
            previous_product_id=5,
            previous_product_handle="basic",
            occurred_at=AT,
        )
        decision = route(body, no_lookup)
        action = emitted(decision)
        assert (action.topic, action.key) == ("subscriptions", "cust-2")
        assert action.record == SubscriptionChange(
            subscription_id=2**40,
            customer_reference="cust-2",
            state="on_hold",
            previous_state="active" if event == "subscription_state_change" else None,
            product_id=6,
            product_handle="pro",
            previous_product_id=5 if event == "subscription_product_change" else None,
            previous_product_handle="basic" if event == "subscription_product_change" else None,
            occurred_at=AT,
            webhook_id=77,
            event_id=88,
            event=event,
            site_id=31615,
            site_subdomain="general-goods",
        )
        assert decision.learn == (2**40, "cust-2")

    def test_component_allocation_change_uses_the_lookup(self) -> None:
        lookup = Lookup({15100141: "cust-3"})
        body = build_body(
            "component_allocation_change",
            webhook_id=177103664,
            event_id=5,
            subscription_id=15100141,
            component_id=277221,
            component_name="Software Seats",
            previous_allocation="0",
            new_allocation="2.5",
            product_id=3792003,
            occurred_at=datetime(2012, 11, 19, 16, 59, 13, tzinfo=UTC),
        )
        decision = route(body, lookup)
        assert lookup.calls == [15100141]
        assert decision.learn is None
        action = emitted(decision)
        assert (action.topic, action.key) == ("subscriptions", "cust-3")
        assert action.record == SubscriptionChange(
            subscription_id=15100141,
            customer_reference="cust-3",
            state="active",
            product_id=3792003,
            components=(
                ComponentAllocation(
                    component_id=277221,
                    component_name="Software Seats",
                    previous_allocation=0.0,
                    new_allocation=2.5,
                ),
            ),
            occurred_at=datetime(2012, 11, 19, 16, 59, 13, tzinfo=UTC),
            webhook_id=177103664,
            event_id=5,
            event="component_allocation_change",
            site_id=31615,
            site_subdomain="general-goods",
        )

    def test_allocation_prefers_the_subscription_product_and_updated_at(self) -> None:
        body = build_body(
            "component_allocation_change",
            product_id=1,
            overrides={
                "payload[subscription][product][id]": "9",
                "payload[subscription][product][handle]": "nine",
                "payload[subscription][updated_at]": "2024-03-10 01:59:58 -0500",
            },
        )
        record = emitted(route(body, Lookup({15100141: "c"}))).record
        assert isinstance(record, SubscriptionChange)
        assert (record.product_id, record.product_handle, record.occurred_at) == (9, "nine", AT)

    def test_subscription_timestamp_falls_back_to_payload_timestamp(self) -> None:
        body = build_body(
            "subscription_state_change",
            drop=["payload[subscription][updated_at]"],
            overrides={"payload[timestamp]": "2024-03-10T06:59:58Z"},
        )
        assert emitted(route(body, no_lookup)).record.occurred_at == AT


class TestDeadLetters:
    def test_undecodable_body(self) -> None:
        decision = route(b"id=1&event=payment_success&payload[memo]=%zz", no_lookup)
        assert decision.webhook_id is None and decision.event is None
        assert dead_letter(decision).reason == "malformed_payload"

    def test_not_utf8(self) -> None:
        assert dead_letter(route(b"id=1&event=\xff", no_lookup)).reason == "malformed_payload"

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            (b"event=payment_success&payload[x]=1", "id"),
            (b"id=&event=payment_success", "id"),
            (b"id=abc&event=payment_success", "id"),
            (b"id=99999999999999999999&event=payment_success", "id"),
            (b"id=1&id=2&event=payment_success", "id"),
            (b"id=5&payload[x]=1", "event"),
            (b"id=5&event=", "event"),
        ],
    )
    def test_missing_or_bad_id_or_event(self, body: bytes, field: str) -> None:
        action = dead_letter(route(body, no_lookup))
        assert action.reason == "malformed_payload"
        assert action.error.startswith(f"{field}:")

    @pytest.mark.parametrize(
        ("event", "key", "value"),
        [
            ("payment_success", "payload[transaction][id]", ""),
            ("payment_success", "payload[transaction][id]", "12x"),
            ("payment_success", "payload[transaction][amount_in_cents]", "64.00"),
            ("payment_success", "payload[transaction][created_at]", ""),
            ("payment_success", "payload[transaction][created_at]", "2016-11-08 16:22:20"),
            ("payment_success", "payload[subscription][id]", "sub_1"),
            ("payment_success", "payload[event_id]", "x"),
            ("refund_success", "payload[refund_id]", ""),
            ("refund_success", "payload[amount_in_cents]", "ten"),
            ("refund_success", "payload[timestamp]", "soon"),
            ("refund_success", "payload[payment_id]", "1.5"),
            ("signup_success", "payload[subscription][id]", ""),
            ("subscription_state_change", "payload[subscription][updated_at]", ""),
            ("subscription_product_change", "payload[previous_product][id]", "p"),
            ("component_allocation_change", "payload[component][id]", ""),
            ("component_allocation_change", "payload[new_allocation]", ""),
            ("component_allocation_change", "payload[new_allocation]", "NaN"),
            ("component_allocation_change", "payload[timestamp]", ""),
            ("component_allocation_change", "payload[site][id]", "31615.0"),
        ],
    )
    def test_required_field_missing_or_unreadable(self, event: str, key: str, value: str) -> None:
        body = build_body(event, overrides={key: value})
        decision = route(body, Lookup({15100141: "cust-1"}))
        action = dead_letter(decision)
        assert action.reason == "malformed_payload"
        assert key in action.error
        assert decision.event == event and decision.webhook_id is not None

    def test_a_field_dropped_entirely_is_named(self) -> None:
        body = build_body("payment_success", drop=["payload[transaction][amount_in_cents]"])
        action = dead_letter(route(body, no_lookup))
        assert action == DeadLetter(
            "malformed_payload",
            "payment_success: payload[transaction][amount_in_cents]: missing or empty",
        )

    def test_errors_never_carry_the_body(self) -> None:
        body = build_body("payment_success", overrides={"payload[transaction][id]": "x" * 5000})
        action = dead_letter(route(body, no_lookup))
        assert "pookie999" not in action.error and len(action.error) < 200

    @pytest.mark.parametrize(
        "event",
        [
            "payment_success",
            "refund_success",
            "signup_success",
            "subscription_state_change",
            "subscription_product_change",
        ],
    )
    @pytest.mark.parametrize("reference", ["", "   "])
    def test_empty_reference(self, event: str, reference: str) -> None:
        lookup = Lookup({15100141: "cust-from-table"})
        decision = route(build_body(event, reference=reference), lookup)
        assert dead_letter(decision).reason == "missing_customer_reference"
        assert lookup.calls == []
        assert decision.learn is None

    @pytest.mark.parametrize("event", ["payment_success", "refund_success", "signup_success"])
    def test_absent_reference_uses_the_lookup(self, event: str) -> None:
        body = build_body(event, reference=None, subscription_id=15100141)
        assert emitted(route(body, Lookup({15100141: "cust-7"}))).key == "cust-7"
        action = dead_letter(route(body, no_lookup))
        assert action.reason == "missing_customer_reference"

    def test_allocation_change_for_an_unknown_subscription(self) -> None:
        body = build_body("component_allocation_change", subscription_id=31337)
        lookup = Lookup({1: "someone-else"})
        action = dead_letter(route(body, lookup))
        assert action.reason == "unknown_subscription"
        assert "31337" in action.error
        assert lookup.calls == [31337]

    def test_malformed_wins_over_reference_problems(self) -> None:
        body = build_body(
            "payment_success", reference="", overrides={"payload[transaction][id]": ""}
        )
        assert dead_letter(route(body, no_lookup)).reason == "malformed_payload"


class TestIgnored:
    @pytest.mark.parametrize(
        "body",
        [
            b"id=123456&event=test&payload[chargify]=testing",
            b"event=test&payload[chargify]=testing",
        ],
    )
    def test_test_event(self, body: bytes) -> None:
        decision = route(body, no_lookup)
        assert decision.action == Ignore(TEST_EVENT)
        assert decision.event == "test"

    @pytest.mark.parametrize("event", EVENTS)
    def test_test_panel_subscription_zero(self, event: str) -> None:
        decision = route(build_body(event, subscription_id=0, event_id=None), Lookup({0: "x"}))
        assert decision.action == Ignore(TEST_PANEL)
        assert decision.learn is None

    def test_test_panel_transaction_zero(self) -> None:
        body = build_body("payment_success", transaction_id=0, event_id=None)
        assert route(body, no_lookup).action == Ignore(TEST_PANEL)

    def test_zero_ids_with_an_event_id_are_not_test_panel(self) -> None:
        body = build_body("payment_success", transaction_id=0, subscription_id=0, event_id=12)
        record = emitted(route(body, no_lookup)).record
        assert isinstance(record, Transaction) and record.transaction_id == 0

    def test_a_missing_event_id_alone_is_not_test_panel(self) -> None:
        assert isinstance(
            route(build_body("signup_success", event_id=None), no_lookup).action, Emit
        )

    @pytest.mark.parametrize(
        "event", ["renewal_success", "statement_settled", "payment_failure", "customer_update", "x"]
    )
    def test_unsupported_events_are_ignored_but_teach_references(self, event: str) -> None:
        pairs = build_pairs("signup_success", subscription_id=9, reference="cust-9")
        pairs[1] = ("event", event)
        decision = route(encode_pairs(pairs), no_lookup)
        assert decision.action == Ignore(UNSUPPORTED_EVENT)
        assert decision.learn == (9, "cust-9")


EXPECTED_FOR_SAMPLE: dict[str, Any] = {
    "test__chargify-docs.chargify.com__1.txt": Ignore(TEST_EVENT),
    "payment_success__maxio-com-stoplight-platform-api-docs__1.txt": "missing_customer_reference",
    "statement_settled__maxio-com-stoplight-platform-api-docs__1.txt": Ignore(UNSUPPORTED_EVENT),
}


class TestRealBodies:
    @pytest.mark.parametrize("name", raw_form_params())
    def test_outcome(self, name: str) -> None:
        decision = route(sample_body(name), Lookup({}))
        expected = EXPECTED_FOR_SAMPLE.get(name, Ignore(TEST_PANEL))
        if isinstance(expected, str):
            assert dead_letter(decision).reason == expected
        else:
            assert decision.action == expected
        assert decision.event == name.split("__")[0]
        assert decision.learn is None

    def test_every_other_raw_sample_is_test_panel_data(self) -> None:
        require_samples()
        others = set(raw_form_names()) - set(EXPECTED_FOR_SAMPLE)
        assert len(others) == 17
        assert all("prowave" in n or "m0dd3r" in n for n in others), others

    def test_real_payment_success_ids(self) -> None:
        decision = route(
            sample_body("payment_success__maxio-com-stoplight-platform-api-docs__1.txt"), no_lookup
        )
        assert (decision.webhook_id, decision.event) == (141765008, "payment_success")

    def test_real_payment_success_with_a_reference_is_a_payment(self) -> None:
        body = sample_body("payment_success__maxio-com-stoplight-platform-api-docs__1.txt")
        body = body.replace(b"[customer][reference]=&", b"[customer][reference]=cust-42&")
        decision = route(body, no_lookup)
        assert decision.action == Emit(
            "transactions",
            "cust-42",
            Transaction(
                transaction_id=161537369,
                kind="payment",
                amount_cents=6400,
                currency=None,
                customer_reference="cust-42",
                subscription_id=15100141,
                memo="Pookie Test - $10 Basic Plan: Renewal payment",
                occurred_at=datetime(2016, 11, 8, 21, 22, 20, tzinfo=UTC),
                webhook_id=141765008,
                event_id=347299364,
                event="payment_success",
                site_id=31615,
                site_subdomain="general-goods",
            ),
        )
        assert decision.learn == (15100141, "cust-42")


def test_builder_default_time_is_used() -> None:
    record = emitted(route(build_body("signup_success"), no_lookup)).record
    assert record.occurred_at == DEFAULT_OCCURRED_AT


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "id",
                    "event",
                    "payload[subscription][id]",
                    "payload[transaction][id]",
                    "payload[subscription][customer][reference]",
                    "payload[event_id]",
                    "payload[transaction][amount_in_cents]",
                    "payload[transaction][created_at]",
                    "payload[subscription]",
                    "payload[component][id]",
                    "payload[timestamp]",
                    "payload[new_allocation]",
                    "payload[subscription][updated_at]",
                    "x[]",
                ]
            ),
            st.one_of(
                st.sampled_from(
                    [
                        "0",
                        "1",
                        "",
                        "payment_success",
                        "test",
                        "component_allocation_change",
                        "2016-11-08 16:22:20 -0500",
                    ]
                ),
                st.text(max_size=6),
            ),
        ),
        max_size=10,
    )
)
def test_route_never_raises(pairs: list[tuple[str, str]]) -> None:
    decision = route(encode_pairs(pairs), Lookup({1: "c"}))
    assert isinstance(decision.action, Emit | Ignore | DeadLetter)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_route_never_raises_on_bytes(body: bytes) -> None:
    assert isinstance(route(body, no_lookup), Decision)


# -- extract_fields: the targeted decode must give what the full decode gives ------------


def full_fields(body: bytes) -> dict[tuple[str, ...], Any] | str:
    """The reference: decode everything, then read FIELDS (or the decoder's error)."""
    try:
        return fields._fields_from_tree(decode_form(body))
    except MalformedPayload as exc:
        return f"MalformedPayload: {exc}"


def python_extract_fields(body: bytes) -> dict[tuple[str, ...], Any]:
    """``extract_fields`` with its scan in Python, as where the C module is not built."""
    found = fields._extract_python(body)
    return found if found is not None else fields._fields_from_tree(decode_form(body))


def fast_fields(body: bytes) -> dict[tuple[str, ...], Any] | str:
    """What ``extract_fields`` gives (or its error), checked to be what the Python scan gives."""
    results = []
    for extract in (extract_fields, python_extract_fields):
        try:
            results.append(extract(body))
        except MalformedPayload as exc:
            results.append(f"MalformedPayload: {exc}")
    assert results[0] == results[1], "the C and the Python scans differ"
    return results[0]


def built_bodies() -> list[bytes]:
    bodies = [build_body(event) for event in EVENTS]
    bodies += [build_body("refund_success", refund_shape="2023")]
    bodies += [build_body(event, reference="", event_id=None) for event in EVENTS]
    bodies += [build_body("payment_success", memo="Caf\u00e9 50% off: a+b=c & more")]
    return bodies


class TestExtractFields:
    @pytest.mark.parametrize("body", built_bodies())
    def test_built_bodies(self, body: bytes) -> None:
        assert fast_fields(body) == full_fields(body)
        # Only a non-ASCII escape (the "é" of one memo) sends a built body the slow way.
        assert (fields._extract_fast(body) is None) == (b"%C3" in body)
        assert (fields._extract_python(body) is None) == (b"%C3" in body)

    def test_every_real_body(self) -> None:
        for name, body in raw_form_samples().items():
            assert fast_fields(body) == full_fields(body), name

    def test_a_known_key_sequence_reads_each_body_s_own_values(self) -> None:
        first = build_body("payment_success", transaction_id=1, memo="one")
        second = build_body("payment_success", transaction_id=2, memo="two%")
        assert extract_fields(first)[("payload", "transaction", "id")] == "1"
        fields = extract_fields(second)
        assert fields[("payload", "transaction", "id")] == "2"
        assert fields[("payload", "transaction", "memo")] == "two%"

    @pytest.mark.parametrize(
        "body",
        [
            b"id=1&event=x&payload[memo]=%zz",  # broken escape in a field we read
            b"id=1&event=x&payload[other]=%4",  # ... and in one we do not
            b"id=1&event=x&payload[other]=%C3%28",  # invalid UTF-8 in an escape
            b"id=1&event=x&payload[other]=\xff",  # invalid UTF-8 in the bytes
            b"id=1&event=x&payload[subscription]=1&payload[subscription][id]=2",  # conflict
            b"id=1&event=x&payload[a]=1&payload[a][b]=2",  # conflict far from any field
            b"id=1&id=2&event=x",  # a repeated field
            b"id=1&event=x&payload[subscription][id][]=5",
            b"id=1&event=x&payload[subscription][id][0]=5",
            b"id=1&event=x&payload%5Bsubscription%5D%5Bid%5D=5",  # an escaped key
            b"id=1&event=x&payload[][subscription][id]=5",
            b"id=1&event=x&payload[subscription][name]=a&payload[subscription][id]=7"
            b"&payload[subscription][name]=b&payload[subscription][id]=8",  # a repeated group
            b"id=1&event=x&payload[0]=a&payload[1]=b",
            b"=x&id=1&&event=y+z&payload[memo]=a=b",
            # An empty key between two repeats turns the group into a list of groups.
            b"payload[zz]=1&=&payload[zz]=2&" + build_body("payment_success"),
            b"payload[foo]=1&=&payload[foo]=2&payload[event_id]=5",
            b"payload[foo]=1&&payload[foo]=2&payload[event_id]=5",  # an empty piece: no effect
            b"id=1&event=x&payload[memo]=caf%C3%A9",
        ],
    )
    def test_unusual_bodies(self, body: bytes) -> None:
        assert fast_fields(body) == full_fields(body)

    def test_the_cache_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(fields, "_LAYOUTS", {})
        monkeypatch.setattr(fields, "_LAYOUTS_MAX", 3)
        for n in range(10):
            body = build_body("signup_success", overrides={f"payload[extra{n}]": "x"})
            assert fast_fields(body) == full_fields(body)
            assert len(fields._LAYOUTS) <= 3

    def test_the_rules_read_only_fields(self) -> None:
        """Every path the decision reads is in FIELDS, so extraction never hides one."""
        read: set[tuple[str, ...]] = set()

        class Recording(dict[tuple[str, ...], Any]):
            def get(self, key: Any, default: Any = None) -> Any:
                read.add(key)
                return super().get(key, default)

        lookup = Lookup({15100141: "cust-1"})
        bodies = [
            *built_bodies(),
            build_body("payment_success", reference=None, drop=["payload[subscription][id]"]),
            build_body("component_allocation_change", drop=["payload[subscription][id]"]),
            build_body("subscription_state_change", drop=["payload[subscription][updated_at]"]),
            build_body("payment_success", subscription_id=0, event_id=None),
        ]
        for body in bodies:
            routing._decide(Recording(extract_fields(body)), lookup)
        assert read <= set(FIELDS), read - set(FIELDS)
        assert len(read) == len(FIELDS), set(FIELDS) - read


_KEYS = st.sampled_from(
    [
        "id",
        "event",
        "payload[event_id]",
        "payload[subscription][id]",
        "payload[subscription][customer][reference]",
        "payload[subscription][customer]",
        "payload[subscription]",
        "payload[subscription][]",
        "payload[subscription][id][]",
        "payload[subscription][id][0]",
        "payload[subscription][0]",
        "payload[transaction][id]",
        "payload[transaction][amount_in_cents]",
        "payload[customer_reference]",
        "payload[component][id]",
        "payload[x][y]",
        "payload[x]",
        "payload%5Bsubscription%5D%5Bid%5D",
        "payload[][subscription][id]",
        "payload",
        "",
        "x[",
        "0",
    ]
)
_VALUES = st.one_of(
    st.sampled_from(
        ["", "0", "1", "payment_success", "a%20b", "%zz", "%C3%A9", "%E9", "a+b", "%3a%3D=", "%\n"]
    ),
    st.text(alphabet="ab1%=+ []_\\\r\néü3dDA", max_size=8),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=12))
def test_extract_fields_matches_a_full_decode(pairs: list[tuple[str, str]]) -> None:
    body = "&".join(f"{key}={value}" for key, value in pairs).encode()
    assert fast_fields(body) == full_fields(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_extract_fields_matches_a_full_decode_on_bytes(body: bytes) -> None:
    assert fast_fields(body) == full_fields(body)

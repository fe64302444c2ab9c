"""The Chargify form decoder against hand-made cases, every real RAW-FORM body, and hypothesis."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargify_stream.schemas import form
from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.form import decode_form, encode_form, encode_pairs, get, parse_pairs
from tests.samples import raw_form_params, raw_form_samples, sample_body

PAYMENT_SUCCESS = "payment_success__maxio-com-stoplight-platform-api-docs__1.txt"
STATEMENT_SETTLED = "statement_settled__maxio-com-stoplight-platform-api-docs__1.txt"


def _leaves(node: Any) -> int:
    if isinstance(node, str):
        return 1
    values = node.values() if isinstance(node, dict) else node
    return sum(_leaves(value) for value in values)


class TestParsePairs:
    def test_splits_on_ampersand_and_first_equals(self) -> None:
        assert parse_pairs(b"a=1&b=x=y&c=&d") == [("a", "1"), ("b", "x=y"), ("c", ""), ("d", "")]

    def test_skips_empty_pieces(self) -> None:
        assert parse_pairs(b"&a=1&&b=2&") == [("a", "1"), ("b", "2")]
        assert parse_pairs(b"") == []

    def test_percent_decodes_utf8_and_plus(self) -> None:
        body = b"memo=Pookie%20Test's%20%2410+plan%3A%20caf%C3%A9&k%5Bx%5D=1"
        assert parse_pairs(body) == [("memo", "Pookie Test's $10 plan: café"), ("k[x]", "1")]

    def test_accepts_lowercase_escapes_and_raw_utf8(self) -> None:
        assert parse_pairs("a=%c3%a9&b=é".encode()) == [("a", "é"), ("b", "é")]

    @pytest.mark.parametrize(
        "body",
        [b"a=%zz", b"a=%4", b"a=100%", b"a=%%41", b"%G1=x", b"a=%C3%28", b"a=%FF", b"a=\xff\xfe"],
    )
    def test_rejects_broken_escapes_and_invalid_utf8(self, body: bytes) -> None:
        with pytest.raises(MalformedPayload):
            parse_pairs(body)

    def test_error_does_not_echo_the_body(self) -> None:
        with pytest.raises(MalformedPayload) as caught:
            parse_pairs(b"payload[customer][email]=secret%40example.com&bad=%zz")
        assert "secret" not in str(caught.value)


class TestDecodeForm:
    def test_bracket_paths_nest(self) -> None:
        body = b"id=1&payload[subscription][customer][reference]=cust-1&payload[subscription][id]=9"
        assert decode_form(body) == {
            "id": "1",
            "payload": {"subscription": {"customer": {"reference": "cust-1"}, "id": "9"}},
        }

    def test_indexed_segments_become_lists_in_index_order(self) -> None:
        body = b"a[1][id]=second&a[0][id]=first&a[0][k]=x&a[2][id]=third"
        assert decode_form(body) == {
            "a": [{"id": "first", "k": "x"}, {"id": "second"}, {"id": "third"}]
        }

    def test_top_level_is_always_a_dict(self) -> None:
        assert decode_form(b"0=x&1=y") == {"0": "x", "1": "y"}

    def test_mixed_index_and_names_stay_a_dict(self) -> None:
        assert decode_form(b"a[0]=x&a[name]=y") == {"a": {"0": "x", "name": "y"}}

    def test_repeated_group_first_key_starts_a_new_element(self) -> None:
        body = (
            b"p[pages][id]=1&p[pages][url]=a&p[pages][id]=2&p[pages][url]=b"
            b"&p[pages][id]=3&p[pages][url]=c&p[after]=z"
        )
        assert decode_form(body) == {
            "p": {
                "pages": [
                    {"id": "1", "url": "a"},
                    {"id": "2", "url": "b"},
                    {"id": "3", "url": "c"},
                ],
                "after": "z",
            }
        }

    def test_nested_repeated_groups(self) -> None:
        body = b"a[g][x]=1&a[g][y][z]=2&a[g][x]=3&a[g][y][z]=4"
        assert decode_form(body) == {
            "a": {"g": [{"x": "1", "y": {"z": "2"}}, {"x": "3", "y": {"z": "4"}}]}
        }

    def test_back_to_back_repeat_is_a_list_of_strings(self) -> None:
        body = b"payload[site][id]=1&payload[errors]=a&payload[errors]=b&payload[x]=2"
        assert decode_form(body) == {
            "payload": {"site": {"id": "1"}, "errors": ["a", "b"], "x": "2"}
        }

    def test_repeat_of_a_later_key_does_not_split_the_group(self) -> None:
        body = b"payload[id]=1&payload[errors]=a&payload[x]=2&payload[errors]=b"
        assert decode_form(body) == {"payload": {"id": "1", "errors": ["a", "b"], "x": "2"}}

    def test_top_level_repeat_is_a_list_of_strings(self) -> None:
        assert decode_form(b"a=1&b=2&a=3") == {"a": ["1", "3"], "b": "2"}

    def test_empty_brackets_append(self) -> None:
        assert decode_form(b"e[]=a&x=1&e[]=b") == {"e": ["a", "b"], "x": "1"}

    def test_keys_that_are_not_bracket_paths_stay_literal(self) -> None:
        assert decode_form(b"a[b=1&c]d=2&e[f]g=3") == {"a[b": "1", "c]d": "2", "e[f]g": "3"}

    @pytest.mark.parametrize("body", [b"a[b]=1&a[b][c]=2", b"a[b][c]=1&a[b]=2", b"a=1&a[]=2"])
    def test_contradicting_shapes_are_malformed(self, body: bytes) -> None:
        with pytest.raises(MalformedPayload):
            decode_form(body)

    def test_values_stay_strings(self) -> None:
        decoded = decode_form(b"n=6400&b=true&e=")
        assert decoded == {"n": "6400", "b": "true", "e": ""}


class TestGet:
    def test_reads_nested_paths_and_list_indexes(self) -> None:
        decoded = decode_form(b"p[s][id]=7&p[l][0][v]=a&p[l][1][v]=b")
        assert get(decoded, "p", "s", "id") == "7"
        assert get(decoded, "p", "l", 1, "v") == "b"
        assert get(decoded, "p", "l", -1, "v") == "b"

    def test_missing_steps_give_the_default(self) -> None:
        decoded = decode_form(b"p[s][id]=7&p[l][0]=a")
        assert get(decoded, "p", "nope", "id") is None
        assert get(decoded, "p", "s", "id", "deeper") is None
        assert get(decoded, "p", "l", 5) is None
        assert get(decoded, "p", "l", "x") is None
        assert get(decoded, "p", "s", "x", default="") == ""


class TestRealBodies:
    @pytest.mark.parametrize("name", raw_form_params())
    def test_every_pair_survives_decoding(self, name: str) -> None:
        body = sample_body(name)
        decoded = decode_form(body)
        assert isinstance(decoded["id"], str) and decoded["id"].isdigit()
        assert isinstance(decoded["event"], str) and decoded["event"]
        assert _leaves(decoded) == len(parse_pairs(body)), "a value was lost or merged"

    @pytest.mark.parametrize("name", raw_form_params())
    def test_encode_pairs_reproduces_the_body_byte_for_byte(self, name: str) -> None:
        body = sample_body(name)
        assert encode_pairs(parse_pairs(body)) == body

    def test_samples_cover_the_raw_bodies_listed_in_the_index(self) -> None:
        assert len(raw_form_samples()) == 20

    def test_payment_success_keeps_three_public_signup_pages(self) -> None:
        decoded = decode_form(sample_body(PAYMENT_SUCCESS))
        product = decoded["payload"]["subscription"]["product"]
        pages = product["public_signup_pages"]
        assert [page["id"] for page in pages] == ["281054", "281240", "282694"]
        assert pages[0]["return_url"] == "http://www.example.com?successfulsignup"
        assert pages[2]["url"] == "https://general-goods.chargify.com/subscribe/jwffwgdd95s8/basic"
        assert all(set(page) == {"id", "return_url", "return_params", "url"} for page in pages)
        # Keys after the repeated group land where they belong, not inside the last page.
        assert decoded["payload"]["subscription"]["credit_card"]["id"] == "10102821"
        assert product["product_family"]["handle"] == "billing-plans"

    def test_payment_success_values(self) -> None:
        decoded = decode_form(sample_body(PAYMENT_SUCCESS))
        transaction = decoded["payload"]["transaction"]
        assert transaction["memo"] == "Pookie Test - $10 Basic Plan: Renewal payment"
        assert transaction["created_at"] == "2016-11-08 16:22:20 -0500"
        assert decoded["payload"]["subscription"]["customer"]["reference"] == ""
        assert decoded["payload"]["event_id"] == "347299364"

    def test_statement_settled_indexed_arrays(self) -> None:
        statement = decode_form(sample_body(STATEMENT_SETTLED))["payload"]["statement"]
        assert [event["key"] for event in statement["events"]] == [
            "renewal_success",
            "payment_success",
            "renewal_success",
        ]
        assert [t["id"] for t in statement["transactions"]] == [
            "161537343",
            "161537344",
            "161537369",
        ]
        assert statement["transactions"][0]["memo"] == "$10 Basic Plan (11/08/2016 - 11/09/2016)"
        assert statement["events"][0]["message"].endswith(
            "Pookie Test's subscription to $10 Basic Plan"
        )


_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="[]"),
    min_size=1,
    max_size=8,
).filter(lambda name: not (name.isdigit() and name.isascii()))
_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_nested = st.recursive(
    _values,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4),
        st.dictionaries(_names, children, min_size=1, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, _nested, min_size=1, max_size=5))
def test_decode_inverts_encode(nested: dict[str, Any]) -> None:
    assert decode_form(encode_form(nested)) == nested


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=12))
def test_flat_pairs_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_pairs(encode_pairs(pairs)) == pairs


def test_encode_form_is_javascript_style() -> None:
    body = encode_form({"payload": {"memo": "Pookie Test's $10 (a/b): x@y,z!", "n": ["1", "2"]}})
    assert body == (
        b"payload[memo]=Pookie%20Test's%20%2410%20(a%2Fb)%3A%20x%40y%2Cz!&payload[n][0]=1&payload[n][1]=2"
    )


@pytest.mark.parametrize("bad", [{"a[b]": "x"}, {"": "x"}, {"a": {"": "x"}}, {"a": 1}])
def test_encode_form_rejects_what_it_cannot_encode(bad: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        encode_form(bad)


def test_keys_nested_deeper_than_the_limit_are_malformed_not_a_crash() -> None:
    deepest = "a" + "[0]" * form.MAX_DEPTH  # MAX_DEPTH parents (a and the indexes), a leaf
    assert form.decode_form(f"{deepest}=1".encode())["a"] is not None
    with pytest.raises(MalformedPayload, match="nested deeper than 32 levels"):
        form.decode_form(("a" + "[0]" * (form.MAX_DEPTH + 1) + "=1").encode())
    with pytest.raises(MalformedPayload):  # once a RecursionError
        form.decode_form(b"a" + b"[0]" * 5000 + b"=1")

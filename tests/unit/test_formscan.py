"""The C field scan (processors/_formscan.c) on its own: built, equal to the Python scan on
large and hostile bodies, and careful with its inputs, errors and memory.

tests/unit/test_fields.py holds both scans to a full decode on built, real and generated
bodies; these tests cover what only C can get wrong.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargify_stream.processors import fields
from tests.builders import EVENTS, build_body

try:
    from chargify_stream.processors._formscan import extract
except ImportError:  # test_the_module_is_built fails; the rest cannot run
    extract = None  # type: ignore[assignment]

needs_module = pytest.mark.skipif(
    extract is None, reason="chargify_stream.processors._formscan is not built"
)


def test_the_module_is_built() -> None:
    assert fields.NATIVE_SCAN, (
        "chargify_stream.processors._formscan is not built, so the processor scans in Python: "
        "run scripts/install on a machine with a C compiler (gcc)"
    )


def scan(body: bytes, layouts: dict[str, Any] | None = None) -> Any:
    assert extract is not None
    return extract(body, {} if layouts is None else layouts, fields._layout)


def python_scan(body: bytes) -> Any:
    return fields._extract_python(body)


@needs_module
class TestAgainstThePythonScan:
    @pytest.mark.parametrize("event", EVENTS)
    def test_built_bodies(self, event: str) -> None:
        body = build_body(event)
        assert scan(body) == python_scan(body)
        assert scan(body)[("event",)] == event

    def test_more_pairs_than_the_first_allocation(self) -> None:
        """The value offsets start with room for 128 pairs and grow."""
        for count in (126, 127, 128, 129, 255, 256, 257, 1000):
            extra = {f"payload[extra][{n}]": f"v{n}%20x+y" for n in range(count)}
            body = build_body("payment_success", overrides=extra)
            assert scan(body) == python_scan(body), count

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            (b"", {}),
            (b"id", {("id",): ""}),
            (b"id=", {("id",): ""}),
            (b"id=1", {("id",): "1"}),
            (b"id=1&", {("id",): "1"}),
            (b"&id=1", {("id",): "1"}),
            (b"id=a=b", {("id",): "a=b"}),
            (b"id=%26%3D%25+%2B", {("id",): "&=% +"}),
            (b"i%64=1", {("id",): "1"}),
            (b"id=%7e%7E", {("id",): "~~"}),
            (b"id=%00", {("id",): "\x00"}),
            (b"id=1&event=a+b&&", {("id",): "1", ("event",): "a b"}),
        ],
    )
    def test_small_bodies(self, body: bytes, expected: dict[tuple[str, ...], str]) -> None:
        assert scan(body) == python_scan(body) == expected

    @pytest.mark.parametrize(
        "body",
        [
            b"id=%",
            b"id=%4",
            b"id=1%",
            b"id=%4&event=x",
            b"id=%80",  # a non-ASCII escape
            b"id=%g0",
            b"id=%0g",
            b"i%=1",
            b"%%41=1",
            b"id=%C3%A9",
            b"=x&id=1",  # an empty key with a value
            b"id=1&=&event=a",
            b"id=1&=",
        ],
    )
    def test_bodies_for_the_full_decoder(self, body: bytes) -> None:
        assert scan(body) is None
        assert python_scan(body) is None

    @pytest.mark.parametrize("body", [b"id=caf\xc3\xa9", b"id=1&x=\xff", b"\x80"])
    def test_a_byte_above_0x7f_goes_to_the_python_scan(self, body: bytes) -> None:
        assert scan(body) is NotImplemented
        assert fields._extract_fast(body) == python_scan(body)

    def test_other_types_go_to_the_python_scan(self) -> None:
        assert scan(bytearray(b"id=1")) is NotImplemented  # type: ignore[arg-type]


_PIECES = st.sampled_from(
    ["id", "event", "payload", "[", "]", "[subscription]", "[id]", "[]", "[0]", "=", "&",
     "&&", "%", "%2", "%20", "%5B", "%5D", "%7F", "%80", "%zz", "+", "a", "1", " ", "\x00"]
)  # fmt: skip


@needs_module
@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=400))
def test_generated_bodies_scan_alike(pieces: list[str]) -> None:
    body = "".join(pieces).encode()
    layouts: dict[str, Any] = {}
    assert scan(body, layouts) == python_scan(body)
    assert scan(body, layouts) == python_scan(body)  # again, through the cached layout


@needs_module
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_scan_alike(body: bytes) -> None:
    result = scan(body)
    if result is not NotImplemented:
        assert result == python_scan(body)


@needs_module
class TestInputsAndErrors:
    def test_the_layout_cache_is_used_and_filled_through_miss(self) -> None:
        assert extract is not None
        layouts: dict[str, Any] = {}
        seen: list[str] = []

        def miss(key_sequence: str) -> Any:
            seen.append(key_sequence)
            layouts[key_sequence] = layout = fields._layout(key_sequence)
            return layout

        assert extract(b"id=1&event=a", layouts, miss) == {("id",): "1", ("event",): "a"}
        assert extract(b"id=2&event=b", layouts, miss) == {("id",): "2", ("event",): "b"}
        assert seen == ["id&event"]
        # The cache is trusted as given: a layout maps paths to pair indices.
        layouts["id&event"] = ((("x",), 1),)
        assert extract(b"id=3&event=c", layouts, miss) == {("x",): "c"}
        layouts["id&event"] = None
        assert extract(b"id=3&event=c", layouts, miss) is None

    def test_an_error_in_miss_propagates(self) -> None:
        assert extract is not None

        def miss(key_sequence: str) -> Any:
            raise RuntimeError(key_sequence)

        with pytest.raises(RuntimeError, match=r"^id&event$"):
            extract(b"id=1&event=a", {}, miss)

    @pytest.mark.parametrize(
        ("layout", "error"),
        [
            (((("id",), 2),), IndexError),
            (((("id",), -1),), IndexError),
            (((("id",), "0"),), TypeError),
            (((("id",),),), TypeError),
            ([(("id",), 0)], TypeError),
        ],
    )
    def test_a_bad_layout_is_an_error(self, layout: Any, error: type[Exception]) -> None:
        with pytest.raises(error):
            scan(b"id=1&event=a", {"id&event": layout})

    def test_bad_arguments(self) -> None:
        assert extract is not None
        with pytest.raises(TypeError):
            extract(b"id=1")  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            extract(b"id=1", [], fields._layout)  # type: ignore[arg-type]

    def test_no_memory_is_kept(self) -> None:
        """Each call frees its key sequence, offsets and values, on every way out."""
        bodies = [
            build_body("payment_success"),
            build_body("payment_success", overrides={f"payload[x][{n}]": "1" for n in range(300)}),
            b"id=%zz",
            b"id=\xff",
        ]
        layouts: dict[str, Any] = {}
        for body in bodies:
            scan(body, layouts)
        tracemalloc.start()
        try:
            for _ in range(3000):
                for body in bodies:
                    scan(body, layouts)
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(3000):
                for body in bodies:
                    scan(body, layouts)
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert after - before < 64 * 1024, after - before

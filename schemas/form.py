"""Chargify's form-encoded webhook bodies: decode into nested values, and encode back.

Chargify posts ``application/x-www-form-urlencoded`` bodies whose keys use bracket paths
(``payload[subscription][customer][reference]=...``). Every value is a string. Arrays of
hashes arrive in two encodings (WEBHOOKS.md §1.5):

* indexed: ``payload[statement][transactions][0][id]=...``; numeric segments become lists;
* repeated, non-indexed keys: ``...[public_signup_pages][id]=1 ...[url]=a
  ...[public_signup_pages][id]=2 ...[url]=b``; the grouping exists only in key order, so a
  repeat of a group's first key starts a new element and the group becomes a list of dicts.

A key repeated back to back (``payload[errors]=a&payload[errors]=b``) or a repeat of a key
that is not its group's first key becomes a list of strings, and ``key[]=...`` always
appends to a list of strings: neither may turn the surrounding group into a list, because
that would hide every later sibling from a path lookup.

Decoding is the processor's main per-record cost, so the hot path avoids regular
expressions and per-character work: one UTF-8 decode of the body, ``str.split`` and
``str.partition`` per pair, and percent-decoding only for the values that contain ``%``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

from chargify_stream.schemas.errors import MalformedPayload

__all__ = ["decode_form", "encode_form", "encode_pairs", "get", "parse_pairs"]

# Every spelling of a two-digit hex escape (any letter case), mapped to its byte.
_HEX_BYTE: dict[str, bytes] = {
    hi + lo: bytes((value,))
    for value in range(256)
    for hi in {f"{value:02x}"[0], f"{value:02X}"[0]}
    for lo in {f"{value:02x}"[1], f"{value:02X}"[1]}
}

# The same for escapes of ASCII characters, which need no UTF-8 step.
_HEX_ASCII: dict[str, str] = {key: chr(byte[0]) for key, byte in _HEX_BYTE.items() if byte[0] < 128}

# JavaScript encodeURIComponent leaves these literal (besides ASCII letters and digits),
# which is what Chargify's bodies show: ``'`` ``(`` ``)`` ``!`` stay, ``$ / : @ ,`` do not.
_SAFE = "-_.!~*'()"


def _percent_decode(text: str) -> str:
    """Decode ``%XX`` escapes as UTF-8; reject broken escapes and invalid UTF-8."""
    head, *chunks = text.split("%")
    out = [head]
    for chunk in chunks:
        char = _HEX_ASCII.get(chunk[:2])
        if char is None:
            # Not a plain ASCII escape: part of a multi-byte character, or broken.
            return _percent_decode_utf8(head, chunks)
        out.append(char)
        out.append(chunk[2:])
    return "".join(out)


def _percent_decode_utf8(head: str, chunks: list[str]) -> str:
    out = [head.encode()]
    for chunk in chunks:
        byte = _HEX_BYTE.get(chunk[:2])
        if byte is None:
            raise MalformedPayload(f"invalid percent-escape %{chunk[:2]!r} in form body")
        out.append(byte)
        out.append(chunk[2:].encode())
    try:
        return b"".join(out).decode()
    except UnicodeDecodeError as exc:
        raise MalformedPayload(
            f"percent-escapes do not decode as UTF-8 at byte {exc.start}"
        ) from None


def parse_pairs(body: bytes) -> list[tuple[str, str]]:
    """Split a form body into decoded ``(key, value)`` pairs, in body order.

    Pairs are separated by ``&`` and split at the first ``=`` (a pair without one has an
    empty value); empty pairs are skipped. Keys and values are percent-decoded as UTF-8 with
    ``+`` as a space. Raises ``MalformedPayload`` for invalid UTF-8 or a broken escape.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"form body is not valid UTF-8 at byte {exc.start}") from None
    # "+" is never a separator and a literal plus arrives as %2B, so one replace on the
    # whole body does what a per-value replace would.
    if "+" in text:
        text = text.replace("+", " ")
    pairs: list[tuple[str, str]] = []
    append = pairs.append
    for piece in text.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        if "%" in key:
            key = _percent_decode(key)
        if "%" in value:
            value = _percent_decode(value)
        append((key, value))
    return pairs


def _split_key(key: str) -> tuple[str, ...]:
    """``a[b][c]`` -> ``("a", "b", "c")``; a key that is not a clean bracket path is literal."""
    open_at = key.find("[")
    if open_at <= 0 or key[-1] != "]":
        return (key,)
    inner = key[open_at + 1 : -1].split("][")
    if any("[" in segment or "]" in segment for segment in inner):
        return (key,)
    return (key[:open_at], *inner)


class _Plan(NamedTuple):
    """How one key lands in the tree: the dicts to walk, then the leaf to set."""

    parents: tuple[str, ...]
    leaf: str
    appends: bool  # ``key[]``: ``leaf`` names a list of strings to append to
    indexed: bool  # some segment is a decimal index


# Key -> plan. Chargify sends the same few hundred keys again and
# again, so each is split once per process.
_PLANS: dict[str, _Plan] = {}
_PLANS_MAX = 8192


MAX_DEPTH = 32


def _plan(key: str) -> _Plan:
    plan = _PLANS.get(key)
    if plan is None:
        path = _split_key(key)
        appends = len(path) > 1 and not path[-1]
        if appends:
            path = path[:-1]
        # An inner ``[]`` adds nothing that key-order grouping does not already do.
        parents = tuple(segment for segment in path[:-1] if segment)
        if len(parents) > MAX_DEPTH:
            # Chargify nests five levels at most; thousands would exhaust the recursion
            # that turns indexed dicts into lists.
            raise MalformedPayload(f"form key nested deeper than {MAX_DEPTH} levels")
        indexed = any(segment.isdigit() for segment in path)
        plan = _Plan(parents, path[-1], appends, indexed)
        if len(_PLANS) < _PLANS_MAX:
            _PLANS[key] = plan
    return plan


def _conflict(key: str) -> MalformedPayload:
    return MalformedPayload(f"form key {key} conflicts with an earlier key of another shape")


def decode_form(body: bytes) -> dict[str, Any]:
    """Decode a form body into nested dicts, lists and string values.

    See the module docstring for how bracket paths, indexed arrays and repeated keys map to
    dicts and lists. Raises ``MalformedPayload`` for undecodable bytes or for keys whose
    shapes contradict each other (``a[b]=1&a[b][c]=2``) or nest deeper than ``MAX_DEPTH``.
    """
    root: dict[str, Any] = {}
    has_index = False
    previous_key = None
    for key, value in parse_pairs(body):
        parents, leaf, appends, indexed = _plan(key)
        if indexed:
            has_index = True
        node = root
        for segment in parents:
            child = node.get(segment)
            if child is None:
                child = node[segment] = {}
            elif type(child) is not dict:
                # A list here is a repeated group: keys go to its newest element.
                if type(child) is not list or type(child[-1]) is not dict:
                    raise _conflict(key)
                child = child[-1]
            node = child
        existing = node.get(leaf)
        if existing is None:
            node[leaf] = [value] if appends else value
        elif type(existing) is list and type(existing[-1]) is str:
            existing.append(value)
        elif type(existing) is not str or appends:
            raise _conflict(key)
        elif not parents or previous_key == key or next(iter(node)) != leaf:
            node[leaf] = [existing, value]
        else:
            _start_group(root, parents, node, leaf, value)
        previous_key = key
    if has_index:
        # The top level stays a dict even if its keys are all digits ("0=x").
        for name, value in root.items():
            if type(value) is not str:
                root[name] = _lists_from_indexes(value)
    return root


def _start_group(
    root: dict[str, Any], parents: tuple[str, ...], node: dict[str, Any], leaf: str, value: str
) -> None:
    """A group's first key came again: ``node`` becomes one element of a list of groups.

    The walk to ``node`` is repeated here to find its container; repeats are rare, so the
    hot loop in ``decode_form`` does not track containers.
    """
    container: Any = root
    for segment in parents[:-1]:
        container = container[segment]
        if type(container) is list:
            container = container[-1]
    group = container[parents[-1]]
    if type(group) is list:
        group.append({leaf: value})
    else:
        container[parents[-1]] = [node, {leaf: value}]


def _lists_from_indexes(node: Any) -> Any:
    """Turn every dict whose keys are all decimal indexes into a list ordered by index."""
    if type(node) is dict:
        for k, v in node.items():
            if type(v) is not str:
                node[k] = _lists_from_indexes(v)
        if node and all(k.isdigit() and k.isascii() for k in node):
            return [node[k] for k in sorted(node, key=int)]
        return node
    if type(node) is list:
        return [item if type(item) is str else _lists_from_indexes(item) for item in node]
    return node


def get(decoded: Mapping[str, Any], *path: str | int, default: Any = None) -> Any:
    """The value at ``path`` (dict keys or list indexes), or ``default`` if any step is missing.

    ``get(d, "payload", "subscription", "id")`` reads ``payload[subscription][id]``.
    """
    node: Any = decoded
    for step in path:
        if type(node) is dict:
            node = node.get(step, default) if type(step) is str else default
        elif type(node) is list and type(step) is int and -len(node) <= step < len(node):
            node = node[step]
        else:
            return default
        if node is default:
            return default
    return node


def _quote(text: str) -> str:
    return quote(text, safe=_SAFE)


def encode_pairs(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode ``(key, value)`` pairs as Chargify does: brackets literal, the rest escaped.

    Each key is a bracket path such as ``payload[subscription][id]``; the name segments and
    the value are escaped like JavaScript's ``encodeURIComponent`` (space as ``%20``).
    """
    parts = []
    for key, value in pairs:
        path = _split_key(key)
        if len(path) == 1:
            quoted = _quote(key)
        else:
            quoted = _quote(path[0]) + "".join(f"[{_quote(seg)}]" for seg in path[1:])
        parts.append(f"{quoted}={_quote(value)}")
    return "&".join(parts).encode("ascii")


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, str):
        out.append((prefix, value))
    elif isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str) or not name or "[" in name or "]" in name:
                raise ValueError(f"cannot encode key {name!r} under {prefix!r}")
            _flatten(f"{prefix}[{name}]" if prefix else name, item, out)
    elif isinstance(value, Sequence):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} at {prefix!r}; values are str")


def encode_form(nested: Mapping[str, Any]) -> bytes:
    """Encode nested dicts, lists and strings as a form body; ``decode_form`` inverts it.

    Lists are written as indexed arrays (``a[0]``, ``a[1]``); use ``encode_pairs`` to write
    the repeated, non-indexed style. Empty dicts and lists have no encoding and vanish;
    dict keys must be non-empty and free of brackets.
    """
    out: list[tuple[str, str]] = []
    _flatten("", nested, out)
    return encode_pairs(out)

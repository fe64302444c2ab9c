"""Dead-letter headers: build them when a record is parked, read them when it is replayed.

A dead-lettered record keeps its key, value and original headers; the ``dlq-*`` headers of
DESIGN.md say why and where it came from. Replay sends it back to ``dlq-source-topic`` with
the original headers and ``dlq-replay-count`` + 1.

A dead letter that cannot be written whole (Kafka refuses it: too large for the topic or
the producer, or an invalid record) is written as a **pointer** instead (:func:`pointer`):
no value, the same ``dlq-*`` headers plus ``dlq-pointer: 1`` and ``dlq-original-size``
(the value's size in bytes), and of the original headers only the small carried-over
ones (webhook id, event, received-at). The original is still on its source topic at
``dlq-source-partition``/``dlq-source-offset``, where a replay reads it back. So a record
that cannot be dead-lettered whole never blocks a stage, and is never lost from sight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from chargify_stream.schemas import headers

__all__ = [
    "ERROR_MAX_CHARS",
    "DeadLetterInfo",
    "dead_letter_headers",
    "event_identity",
    "format_timestamp",
    "parse_dead_letter",
    "pointer",
    "recency",
    "replay_headers",
]

ERROR_MAX_CHARS = 500
# A pointer must always fit: it keeps the key and each carried-over header only up to these.
POINTER_KEY_MAX = 1024
POINTER_HEADER_MAX = 1024

Headers = list[tuple[str, bytes]]

# A run of text holding both "=" and "&" is form data (a body or part of one). Error
# messages should never carry it, but a message built from a library exception might.
_FORM_DATA = re.compile(r"\S*=\S*&\S*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """What the ``dlq-*`` headers of a dead-lettered record say."""

    reason: str
    stage: str
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: datetime | None
    replay_count: int
    pointer: bool = False
    original_size: int | None = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_identity(
    webhook_id: str | None, source_topic: str, source_partition: int, source_offset: int
) -> str:
    """Which dead-lettered **event** a dead letter belongs to (``dlq`` and the re-driver).

    Its webhook id when it has one: every record of the pipeline carries it, one webhook
    yields at most one record per topic, and it survives replays (which re-publish at a new
    source offset, and may fail at another stage). Else the failed record's source position.
    """
    if webhook_id:
        return f"webhook:{webhook_id}"
    return f"source:{source_topic}[{source_partition}]@{source_offset}"


def recency(
    replay_count: int, failed_at: datetime | None, partition: int, offset: int
) -> tuple[int, datetime, int, int]:
    """Sort key of an event's dead letters: the highest is its **latest** failure.

    The one replayed most (``dlq-replay-count``), then the latest ``dlq-failed-at``, then
    the later position on the dead-letter topic.
    """
    return (replay_count, failed_at or _EPOCH, partition, offset)


def _is_dlq(name: str) -> bool:
    return name.lower().startswith("dlq-")


def _clean_error(error: str) -> str:
    text = _FORM_DATA.sub("[form data removed]", error)
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > ERROR_MAX_CHARS:
        text = text[: ERROR_MAX_CHARS - 3] + "..."
    return text


def _replay_count(original: Sequence[tuple[str, bytes | None]]) -> int:
    """The last ``dlq-replay-count`` in ``original``; 0 when absent or unreadable."""
    count = 0
    for name, value in original:
        if name.lower() == headers.DLQ_REPLAY_COUNT and value is not None:
            try:
                count = max(0, int(value.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                count = 0
    return count


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``, as in ``received-at`` and ``dlq-failed-at``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(
    *,
    reason: str,
    stage: str,
    error: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    original_headers: Sequence[tuple[str, bytes]],
    replay_count: int | None = None,
    failed_at: datetime | None = None,
) -> Headers:
    """The headers of a dead-letter record: the original ones (minus old ``dlq-*``) + ``dlq-*``.

    ``reason`` must be one of ``headers.REASONS`` and ``stage`` ``processor`` or ``sink``.
    ``error`` is made single-line, stripped of anything that looks like form data and cut
    to ``ERROR_MAX_CHARS`` characters. ``replay_count`` defaults to the
    ``dlq-replay-count`` the original headers carry (a replayed record that fails again),
    else 0. ``failed_at`` defaults to now.
    """
    if reason not in headers.REASONS:
        raise ValueError(
            f"unknown dead-letter reason {reason!r}; expected one of {headers.REASONS}"
        )
    if stage not in (headers.STAGE_PROCESSOR, headers.STAGE_SINK):
        raise ValueError(f"unknown dead-letter stage {stage!r}")
    if replay_count is None:
        replay_count = _replay_count(original_headers)
    if failed_at is None:
        failed_at = datetime.now(UTC)
    kept = [(name, value) for name, value in original_headers if not _is_dlq(name)]
    return [
        *kept,
        (headers.DLQ_REASON, reason.encode()),
        (headers.DLQ_STAGE, stage.encode()),
        (headers.DLQ_ERROR, _clean_error(error).encode()),
        (headers.DLQ_SOURCE_TOPIC, source_topic.encode()),
        (headers.DLQ_SOURCE_PARTITION, str(source_partition).encode()),
        (headers.DLQ_SOURCE_OFFSET, str(source_offset).encode()),
        (headers.DLQ_FAILED_AT, format_timestamp(failed_at).encode()),
        (headers.DLQ_REPLAY_COUNT, str(replay_count).encode()),
    ]


def pointer(
    key: bytes | None, value_size: int, dead_letter: Sequence[tuple[str, bytes]], *, refusal: str
) -> tuple[bytes | None, Headers]:
    """The key and headers of the pointer to a dead letter that Kafka refused whole.

    ``dead_letter`` is the refused record's headers (from :func:`dead_letter_headers`),
    ``value_size`` its value's length, ``refusal`` why Kafka refused it (added to
    ``dlq-error``). A key longer than ``POINTER_KEY_MAX`` bytes is left off.
    """
    carried = [
        (name, value)
        for name, value in dead_letter
        if name in headers.CARRIED_OVER and len(value) <= POINTER_HEADER_MAX
    ]
    dlq: Headers = []
    for name, value in dead_letter:
        lowered = name.lower()
        if lowered == headers.DLQ_ERROR:
            text = value.decode("utf-8", errors="replace")
            note = f" [written as a pointer, the original is on its source topic: {refusal[:200]}]"
            value = (_clean_error(text[: ERROR_MAX_CHARS - len(note)] + note)).encode()
        if _is_dlq(lowered) and lowered not in (headers.DLQ_POINTER, headers.DLQ_ORIGINAL_SIZE):
            dlq.append((name, value))
    kept_key = key if key is not None and len(key) <= POINTER_KEY_MAX else None
    return kept_key, [
        *carried,
        *dlq,
        (headers.DLQ_POINTER, b"1"),
        (headers.DLQ_ORIGINAL_SIZE, str(value_size).encode()),
    ]


def replay_headers(dead_letter: Sequence[tuple[str, bytes]]) -> Headers:
    """Headers for re-publishing a dead letter: the originals plus ``dlq-replay-count`` + 1."""
    count = _replay_count(dead_letter)
    kept = [(name, value) for name, value in dead_letter if not _is_dlq(name)]
    return [*kept, (headers.DLQ_REPLAY_COUNT, str(count + 1).encode())]


def parse_dead_letter(record_headers: Sequence[tuple[str, bytes | None]]) -> DeadLetterInfo | None:
    """Read the ``dlq-*`` headers; ``None`` unless reason, stage, source topic, partition and
    offset are all present and readable (the record is not a dead letter)."""
    found: dict[str, str] = {}
    for name, value in record_headers:
        lowered = name.lower()
        if _is_dlq(lowered) and value is not None:
            found[lowered] = value.decode("utf-8", errors="replace")
    try:
        partition = int(found[headers.DLQ_SOURCE_PARTITION])
        offset = int(found[headers.DLQ_SOURCE_OFFSET])
        info = DeadLetterInfo(
            reason=found[headers.DLQ_REASON],
            stage=found[headers.DLQ_STAGE],
            error=found.get(headers.DLQ_ERROR, ""),
            source_topic=found[headers.DLQ_SOURCE_TOPIC],
            source_partition=partition,
            source_offset=offset,
            failed_at=_parse_time(found.get(headers.DLQ_FAILED_AT)),
            replay_count=max(0, int(found.get(headers.DLQ_REPLAY_COUNT) or 0)),
            pointer=found.get(headers.DLQ_POINTER) == "1",
            original_size=_size(found.get(headers.DLQ_ORIGINAL_SIZE)),
        )
    except (KeyError, ValueError):
        return None
    return info


def _size(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo is not None else None

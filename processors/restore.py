"""Bringing the local state of some raw partitions up to their changelogs' ends.

A worker assigned raw partitions reads each one's two changelog partitions from the
position its local copy reached (:meth:`processors.state.Store.position`; from the start
when it has none) to their end, ``read_committed`` (so what an aborted or a zombie's
transaction wrote is never applied), and applies them. The end is where librdkafka reports
end-of-partition (the last stable offset); that position is stored with what was applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from chargify_stream.base.retry import retry
from chargify_stream.processors.state import DEDUP, REFERENCES, Store, parse_dedup

if TYPE_CHECKING:
    from chargify_stream.processors.clients import Changelogs

__all__ = ["restore"]

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0


def restore(
    make_restorer: Callable[[], Consumer],
    store: Store,
    changelogs: Changelogs,
    partitions: Sequence[int],
) -> int:
    """Read the changelogs of ``partitions`` from the local copy's positions to their
    ends, and apply them; how many records were read."""
    wanted: list[TopicPartition] = []
    restorer = make_restorer()
    try:
        for kind in (REFERENCES, DEDUP):
            topic = changelogs.of(kind)
            for p in partitions:
                start = store.position(topic, p)
                tp = TopicPartition(topic, p)
                low, high = _watermarks(restorer, tp)
                if start is not None and start >= high:
                    continue
                tp.offset = OFFSET_BEGINNING if start is None or start < low else start
                wanted.append(tp)
        if not wanted:
            return 0
        restorer.assign(wanted)
        return _read_to_end(restorer, wanted, store, changelogs)
    finally:
        restorer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    """The partition's low and high watermarks, asked again while the broker cannot say
    (a topic just created has no leader for a moment)."""

    def give_up(exc: BaseException, _attempt: int) -> bool:
        error: KafkaError = exc.args[0]
        return error.fatal() or not (error.retriable() or _no_leader(error))

    def again(exc: BaseException, _pause: float, _attempt: int) -> None:
        log.info("asking for %s[%d]'s offsets: %s; again", tp.topic, tp.partition, exc.args[0])

    low, high = retry(
        lambda: consumer.get_watermark_offsets(tp, timeout=CALL_TIMEOUT_S),
        retry_on=KafkaException,
        first=0.1,
        most=2.0,
        give_up=give_up,
        on_retry=again,
    )
    return low, high


def _no_leader(error: KafkaError) -> bool:
    return error.code() in (
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    )


def _read_to_end(
    restorer: Consumer, wanted: list[TopicPartition], store: Store, changelogs: Changelogs
) -> int:
    """Apply every committed changelog record of ``wanted`` up to the end (EOF)."""
    pending = {(tp.topic, tp.partition) for tp in wanted}
    count = 0
    while pending:
        references: dict[tuple[int, str], str] = {}
        seen: list[tuple[float, Iterable[int]]] = []
        positions: dict[tuple[str, int], int] = {}
        # At most 500 records (500,000 keys) applied at once: bounded memory.
        for message in restorer.consume(500, 1.0):
            error = message.error()
            topic, partition = message.topic() or "", message.partition() or 0
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((topic, partition))
                    positions[topic, partition] = message.offset() or 0  # the end
                elif error.fatal():
                    raise KafkaException(error)
                continue
            count += 1
            positions[topic, partition] = (message.offset() or 0) + 1
            value = message.value()
            if value is None:
                continue
            if topic == changelogs.references:
                references[partition, (message.key() or b"").decode()] = value.decode()
            else:
                seen.append(parse_dedup(value))
        store.apply(references=references, seen=seen, positions=positions)
    return count

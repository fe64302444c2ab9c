"""Which raw records a worker may process next, and the only offsets it commits.

Faust-streaming 0.15 can hand an agent a partition's records with a stretch missing and
then commit past the stretch. Three of its mechanisms combine to do it:

- a stream silently skips records that arrive while flow is paused or that carry an
  older consumer generation, trusting a later seek to read them again;
- that seek, to the committed offset once partitions are assigned, does nothing when
  the group has committed nothing (or offset 0), and it races the fetcher, which is
  already delivering the partitions it resumed a moment earlier;
- the fetcher takes any jump between two delivered offsets as a stretch "acked" by
  default, so the next commit covers records no agent ever saw.

(See ``test_a_worker_stopped_mid_stream_loses_nothing``, which lost 36 to 130 records in
one start in five before this module existed.)

So the worker keeps its own account. :class:`Positions` holds, per partition and
consumer generation, the next offset the worker must process: at first the group's
committed offset on the broker (or the partition's earliest offset when nothing is
committed), then the offset after the last record whose outputs the broker
acknowledged. A batch is admitted record by record: a record below the position was
processed already (a redelivery) and is passed over; a record above it means records
were skipped, so the partition is sought back to the position and the records past the
hole held, to come again; a partition with records past its position that stops delivering
is read again too (:meth:`Positions.unstick`). For the seek back to work, Faust's
fetch loop must deliver every record it fetches (:func:`deliver_every_record`). Commits
(:func:`commit_positions_only`) are the positions, never Faust's own reckoning.

The raw topic is written by non-transactional producers and never compacted, so its
offsets have no holes; two exceptions are still handled: records deleted by retention
before anyone read them (the position moves to the earliest offset, with a warning), and
holes that re-reading never fills, which are skipped only once the broker, read apart
from the consumer, confirms that the offsets are absent (transaction markers), with an
error. A record that exists is never skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Admission",
    "Broker",
    "Positions",
    "commit_positions_only",
    "deliver_every_record",
]

log = logging.getLogger(__name__)

TP = Any  # faust.types.TP: a (topic, partition) named tuple


class Broker(Protocol):
    """What :class:`Positions` needs from Kafka."""

    async def committed(self, tps: Collection[TP]) -> Mapping[TP, int | None]:
        """The group's committed offset of each partition, None where it has none."""
        ...

    async def earliest(self, tps: Collection[TP]) -> Mapping[TP, int]:
        """Each partition's earliest offset still in the log."""
        ...

    async def seek(self, tp: TP, offset: int) -> None:
        """Make the consumer read ``tp`` again from ``offset``."""
        ...

    async def first_offset(self, tp: TP, offset: int) -> int | None:
        """The offset of the first record at or after ``offset``, read apart from the
        consumer; None if none could be read."""
        ...


@dataclass
class Admission:
    """What to do with one batch: see :meth:`Positions.admit`."""

    generation: int
    admitted: list[int] = field(default_factory=list)
    """Indexes into the batch of the records to process, in batch order."""
    ends: dict[TP, int] = field(default_factory=dict)
    """Per partition with admitted records, the offset after the last one."""
    repeated: int = 0
    """Records passed over: processed already, or of an older consumer generation."""
    held: int = 0
    """Records past a hole, left to come again after the seek back."""


@dataclass
class _Reread:
    target: int
    generation: int
    count: int = 0
    at: float = float("-inf")

    def of(self, target: int, generation: int) -> bool:
        return (self.target, self.generation) == (target, generation)


class Positions:
    """The next raw offset to process, per partition, for the current generation.

    ``reread_every`` spaces the seeks back for one hole (records already fetched past
    it keep arriving for a moment after a seek). After ``give_up_after`` of them the
    broker is asked directly which record follows the hole: only if it confirms that
    the offsets are absent from the log is the hole skipped. A partition that has
    records past its position but delivers none for ``stuck_after`` seconds is read
    again (:meth:`unstick`).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        reread_every: float = 1.0,
        give_up_after: int = 5,
        stuck_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._reread_every = reread_every
        self._give_up_after = give_up_after
        self._stuck_after = stuck_after
        self._clock = clock
        self._next: dict[TP, tuple[int, int]] = {}
        self._rereads: dict[TP, _Reread] = {}
        self._moved_at: dict[TP, float] = {}
        self._unstuck_at: dict[TP, float] = {}
        self._unknown_since: dict[TP, tuple[int, float]] = {}
        self.rereads = 0
        """Seeks back made so far (a count for the metrics)."""

    def position(self, tp: TP, generation: int) -> int | None:
        """The next offset to process in ``tp``, if known for this generation."""
        known = self._next.get(tp)
        return known[1] if known is not None and known[0] == generation else None

    def committable(self, generation: int) -> dict[TP, int]:
        """The offsets to commit: every known position of this generation."""
        return {tp: offset for tp, (g, offset) in self._next.items() if g == generation}

    async def admit(self, records: Sequence[tuple[TP, int, int]], generation: int) -> Admission:
        """Decide a batch of ``(tp, offset, generation)``: which records to process.

        A record at its partition's expected offset is admitted (and the next offset is
        expected), one below it is passed over, one above it is held. The first record
        of a partition found above its expected offset in a batch starts a re-read of
        the hole (:meth:`_hole`); the re-read records may already be later in the same
        batch, behind records fetched before the seek.
        """
        admission = Admission(generation)
        expect = await self._expectations(records, generation)
        checked: set[TP] = set()
        for index, (tp, offset, record_generation) in enumerate(records):
            if record_generation != generation:
                admission.repeated += 1
                continue
            expected = expect[tp]
            if offset > expected and tp not in checked:
                checked.add(tp)
                moved = await self._hole(tp, generation, expected, offset)
                if moved is not None:
                    expected = expect[tp] = moved
            if offset < expected:
                admission.repeated += 1
            elif offset > expected:
                admission.held += 1
            else:
                admission.admitted.append(index)
                expect[tp] = admission.ends[tp] = offset + 1
        return admission

    def done(self, admission: Admission) -> None:
        """The admitted records' outputs are acknowledged: move the positions on."""
        now = self._clock()
        for tp, end in admission.ends.items():
            self._next[tp] = (admission.generation, end)
            self._moved_at[tp] = now
            reread = self._rereads.get(tp)
            if reread is not None and reread.target < end:  # the hole is filled
                del self._rereads[tp]

    async def unstick(self, highwaters: Mapping[TP, int | None], generation: int) -> None:
        """Read a partition again if it has records past its position but none come.

        A hole is found when a later record arrives; this finds the hole that nothing
        follows (the skipped records were the partition's last), including records
        skipped before any record of this generation arrived. ``highwaters`` are the
        assigned partitions' log end offsets as the consumer last saw them.
        """
        now = self._clock()
        for tp, highwater in highwaters.items():
            if highwater is None or highwater <= 0:
                continue
            position = self.position(tp, generation)
            if position is None:
                waiting = self._unknown_since.get(tp)
                if waiting is None or waiting[0] != generation:
                    self._unknown_since[tp] = (generation, now)
                    continue
                if now - waiting[1] < self._stuck_after:
                    continue
                del self._unknown_since[tp]
                await self._expectations([(tp, highwater, generation)], generation)
                continue  # the position is known from now on; wait again for progress
            if highwater <= position:
                self._moved_at[tp] = now
                continue
            since = max(self._moved_at.setdefault(tp, now), self._unstuck_at.get(tp, -1e18))
            if now - since < self._stuck_after:
                continue
            self._unstuck_at[tp] = now
            self.rereads += 1
            log.warning(
                "%s[%d]: nothing processed for %.0fs though offsets %d-%d are in the log; "
                "reading again from %d",
                tp.topic,
                tp.partition,
                now - since,
                position,
                highwater - 1,
                position,
            )
            await self._broker.seek(tp, position)

    async def _expectations(
        self, records: Sequence[tuple[TP, int, int]], generation: int
    ) -> dict[TP, int]:
        expect: dict[TP, int] = {}
        unknown: set[TP] = set()
        for tp, _, record_generation in records:
            if record_generation != generation or tp in expect or tp in unknown:
                continue
            known = self.position(tp, generation)
            if known is None:
                unknown.add(tp)
            else:
                expect[tp] = known
        if unknown:
            committed = await self._broker.committed(unknown)
            missing = {tp for tp in unknown if committed.get(tp) is None}
            earliest = await self._broker.earliest(missing) if missing else {}
            for tp in unknown:
                known = self.position(tp, generation)  # set while this was waiting?
                if known is not None:
                    expect[tp] = known
                    continue
                start = committed.get(tp)
                start = earliest[tp] if start is None else start
                self._next[tp] = (generation, start)
                self._moved_at[tp] = self._clock()
                expect[tp] = start
                log.info("%s[%d]: processing from offset %d", tp.topic, tp.partition, start)
        return expect

    async def _hole(self, tp: TP, generation: int, expected: int, offset: int) -> int | None:
        """Offset ``offset`` came while ``expected`` was next: the offset to expect now.

        None means: unchanged, the partition is being read again from ``expected``.
        """
        reread = self._rereads.get(tp)
        now = self._clock()
        if (
            reread is not None
            and reread.of(expected, generation)
            and now - reread.at < self._reread_every
        ):
            return None  # the last seek back has not taken effect yet
        moved = False
        earliest = (await self._broker.earliest([tp]))[tp]
        if expected < earliest:
            moved = True
            start = min(earliest, offset)
            log.warning(
                "%s[%d]: offsets %d-%d were deleted by retention before this group read "
                "them; continuing at %d",
                tp.topic,
                tp.partition,
                expected,
                start - 1,
                start,
            )
            self._next[tp] = (generation, start)
            self._rereads.pop(tp, None)
            if offset == start:
                return start
            expected = start
        reread = self._rereads.get(tp)
        if reread is None or not reread.of(expected, generation):
            reread = self._rereads[tp] = _Reread(expected, generation)
        if reread.count >= self._give_up_after:
            first = await self._broker.first_offset(tp, expected)
            if first is not None and first > expected:
                log.error(
                    "%s[%d]: offsets %d-%d are not in the log (the broker's first record "
                    "from %d is %d: transaction markers or compaction); continuing at %d",
                    tp.topic,
                    tp.partition,
                    expected,
                    first - 1,
                    expected,
                    first,
                    first,
                )
                del self._rereads[tp]
                self._next[tp] = (generation, first)
                return first
            if reread.count == self._give_up_after:
                log.error(
                    "%s[%d]: offset %d is in the log but %d re-reads have not delivered it; "
                    "still trying (nothing of this partition is committed past it)",
                    tp.topic,
                    tp.partition,
                    expected,
                    reread.count,
                )
        reread.count += 1
        reread.at = now
        self.rereads += 1
        log.warning(
            "%s[%d]: offset %d arrived while %d was next (the consumer skipped records); "
            "reading again from %d",
            tp.topic,
            tp.partition,
            offset,
            expected,
            expected,
        )
        await self._broker.seek(tp, expected)
        return expected if moved else None


class _ReadOffsets(MutableMapping[TP, "int | None"]):
    """Faust's per-partition "last read offset", forgotten for one topic.

    Faust's fetch loop drops a record below the last read offset and takes a jump above
    it as a stretch already acked; after a seek both go wrong (records read again are
    dropped, records never processed are reckoned done). For the raw topic
    :class:`Positions` does that job, so every fetched record is delivered.
    """

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._offsets: dict[TP, int | None] = {}

    def __getitem__(self, tp: TP) -> int | None:
        return None if tp.topic == self._topic else self._offsets.get(tp)

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        if tp.topic != self._topic:
            self._offsets[tp] = offset

    def __delitem__(self, tp: TP) -> None:
        self._offsets.pop(tp, None)

    def __iter__(self) -> Iterator[TP]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)


def deliver_every_record(consumer: Any, topic: str) -> None:
    """Make a Faust consumer hand every fetched record of ``topic`` to its stream.

    Call before the consumer starts (its fetch loop keeps a reference to the mapping).
    """
    consumer._read_offset = _ReadOffsets(topic)


def commit_positions_only(
    consumer: Any, positions: Positions, generation: Callable[[], int]
) -> None:
    """Make a Faust consumer commit ``positions``, never its own acked-offset reckoning.

    Faust still decides when to commit (every ``broker_commit_interval``, on stop); this
    replaces what it commits. Its acked-offset bookkeeping is emptied at each commit,
    which keeps it from growing (it is not consulted any more).
    """

    def committable(tps: Iterable[TP]) -> dict[TP, int]:
        # Every position, not only the partitions Faust names (those with acks since its
        # last commit): at a rebalance it has already forgotten the revoked ones.
        for tp in list(consumer._acked):
            consumer._acked[tp].clear()
            consumer._acked_index[tp].clear()
        consumer._gap.clear()
        offsets = positions.committable(generation())
        return {tp: o for tp, o in offsets.items() if consumer._should_commit(tp, o)}

    consumer._filter_committable_offsets = committable

"""``processors.positions``: admission of raw records, re-reads, unsticking, and the Faust
consumer patches, on a fake broker and a fake clock."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import pytest
from faust.types import TP

from processors.positions import (
    Admission,
    Positions,
    commit_positions_only,
    deliver_every_record,
)

RAW = "raw"
A = TP(RAW, 0)
B = TP(RAW, 1)
C = TP(RAW, 2)


class FakeBroker:
    """Answers from ``committed_offsets``/``earliest_offsets``; records every seek."""

    def __init__(
        self,
        committed: Mapping[TP, int | None] | None = None,
        earliest: Mapping[TP, int] | None = None,
    ) -> None:
        self.committed_offsets: dict[TP, int | None] = dict(committed or {})
        self.earliest_offsets: dict[TP, int] = dict(earliest or {})
        self.seeks: list[tuple[TP, int]] = []
        self.committed_asked: list[set[TP]] = []

    async def committed(self, tps: Collection[TP]) -> Mapping[TP, int | None]:
        self.committed_asked.append(set(tps))
        return {tp: self.committed_offsets.get(tp) for tp in tps}

    async def earliest(self, tps: Collection[TP]) -> Mapping[TP, int]:
        return {tp: self.earliest_offsets.get(tp, 0) for tp in tps}

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


class Clock:
    """A mutable time, read through :attr:`read`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.read: Callable[[], float] = lambda: self.now


def make(
    broker: FakeBroker,
    clock: Clock | None = None,
    *,
    reread_every: float = 1.0,
    give_up_after: int = 5,
    stuck_after: float = 5.0,
) -> Positions:
    return Positions(
        broker,
        reread_every=reread_every,
        give_up_after=give_up_after,
        stuck_after=stuck_after,
        clock=(clock or Clock()).read,
    )


def admit(
    positions: Positions, records: Sequence[tuple[TP, int, int]], generation: int = 1
) -> Admission:
    return asyncio.run(positions.admit(records, generation))


def unstick(positions: Positions, highwaters: Mapping[TP, int | None], generation: int = 1) -> None:
    asyncio.run(positions.unstick(highwaters, generation))


def recs(tp: TP, offsets: range | Sequence[int], generation: int = 1) -> list[tuple[TP, int, int]]:
    return [(tp, offset, generation) for offset in offsets]


# -- where a partition starts ------------------------------------------------------------


def test_first_batch_starts_at_the_committed_offset(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(committed={A: 5}, earliest={A: 0})
    positions = make(broker)
    with caplog.at_level(logging.INFO, logger="processors.positions"):
        admission = admit(positions, recs(A, range(3, 8)))
    assert admission.admitted == [2, 3, 4]  # offsets 5, 6, 7
    assert admission.repeated == 2  # offsets 3 and 4: processed already
    assert admission.held == 0
    assert admission.ends == {A: 8}
    assert admission.generation == 1
    assert broker.seeks == []
    assert "raw[0]: processing from offset 5" in caplog.messages


def test_nothing_committed_starts_at_the_earliest_offset() -> None:
    broker = FakeBroker(committed={A: None}, earliest={A: 4})
    positions = make(broker)
    admission = admit(positions, recs(A, range(4, 7)))
    assert admission.admitted == [0, 1, 2]
    assert admission.ends == {A: 7}
    assert admission.repeated == admission.held == 0
    assert broker.seeks == []


def test_committed_zero_is_a_position_not_nothing() -> None:
    broker = FakeBroker(committed={A: 0, B: None}, earliest={A: 0, B: 2})
    positions = make(broker)
    admission = admit(positions, recs(A, [0, 1]) + recs(B, [2]))
    assert admission.admitted == [0, 1, 2]
    assert admission.ends == {A: 2, B: 3}
    assert positions.position(A, 1) == 0 and positions.position(B, 1) == 2


def test_committed_offsets_are_asked_once_per_unknown_partition() -> None:
    broker = FakeBroker(committed={A: 0, B: 0})
    positions = make(broker)
    admission = admit(positions, recs(A, [0]) + recs(B, [0]) + recs(A, [1]))
    positions.done(admission)
    admit(positions, recs(A, [2]) + recs(B, [1]))
    assert broker.committed_asked == [{A, B}]


# -- contiguous records and positions ----------------------------------------------------


def test_interleaved_partitions_are_admitted_in_batch_order() -> None:
    broker = FakeBroker(committed={A: 10, B: 20, C: 30})
    positions = make(broker)
    batch = [(A, 10, 1), (B, 20, 1), (A, 11, 1), (C, 30, 1), (B, 21, 1), (A, 12, 1)]
    admission = admit(positions, batch)
    assert admission.admitted == [0, 1, 2, 3, 4, 5]
    assert admission.ends == {A: 13, B: 22, C: 31}
    assert admission.repeated == admission.held == 0

    # The starting points are known, but nothing moves until the outputs are acknowledged.
    assert positions.position(A, 1) == 10
    assert positions.position(B, 1) == 20
    assert positions.committable([A, B, C], 1) == {A: 10, B: 20, C: 30}

    positions.done(admission)
    assert positions.position(A, 1) == 13
    assert positions.position(B, 1) == 22
    assert positions.position(C, 1) == 31
    assert positions.committable([A, B, C], 1) == {A: 13, B: 22, C: 31}
    assert positions.committable([A], 1) == {A: 13}
    assert broker.seeks == []


def test_an_admission_not_done_is_admitted_again() -> None:
    broker = FakeBroker(committed={A: 0})
    positions = make(broker)
    first = admit(positions, recs(A, range(3)))
    again = admit(positions, recs(A, range(3)))
    assert first.admitted == again.admitted == [0, 1, 2]
    positions.done(again)
    redelivered = admit(positions, recs(A, range(5)))
    assert redelivered.admitted == [3, 4]
    assert redelivered.repeated == 3
    assert redelivered.ends == {A: 5}


def test_unknown_partitions_have_no_position() -> None:
    positions = make(FakeBroker())
    assert positions.position(A, 1) is None
    assert positions.committable([A, B], 1) == {}


# -- holes and re-reads ------------------------------------------------------------------


def test_a_hole_holds_its_partition_and_seeks_back_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = FakeBroker(committed={A: 10, B: 0})
    clock = Clock(100.0)
    positions = make(broker, clock, reread_every=1.0)
    batch = [(A, 12, 1), (B, 0, 1), (A, 13, 1), (B, 1, 1), (A, 14, 1)]
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, batch)
    assert admission.admitted == [1, 3]  # only B's records
    assert admission.held == 3
    assert admission.repeated == 0
    assert admission.ends == {B: 2}
    assert broker.seeks == [(A, 10)]
    assert positions.rereads == 1
    assert any(
        r.levelno == logging.WARNING and "offset 12 arrived while 10 was next" in r.getMessage()
        for r in caplog.records
    )
    positions.done(admission)
    assert positions.committable([A, B], 1) == {A: 10, B: 2}

    # Records fetched before the seek keep coming: no second seek within reread_every.
    clock.now = 100.5
    admission = admit(positions, recs(A, [15, 16]) + recs(B, [2]))
    assert admission.admitted == [2]
    assert admission.held == 2
    assert broker.seeks == [(A, 10)]
    positions.done(admission)

    # Past reread_every with the hole still there: read again.
    clock.now = 101.0
    admission = admit(positions, recs(A, [17]))
    assert admission.admitted == []
    assert admission.held == 1
    assert broker.seeks == [(A, 10), (A, 10)]
    assert positions.rereads == 2

    # The re-read arrives, the expected offset first: admitted, the re-read is over.
    clock.now = 101.2
    admission = admit(positions, recs(A, range(10, 18)))
    assert admission.admitted == list(range(8))
    assert admission.held == admission.repeated == 0
    assert admission.ends == {A: 18}
    positions.done(admission)
    assert positions.position(A, 1) == 18
    assert positions._rereads == {}  # no re-read pending any more

    # A new hole at the new position is sought at once.
    clock.now = 101.3
    admission = admit(positions, recs(A, [20]))
    assert admission.held == 1
    assert broker.seeks == [(A, 10), (A, 10), (A, 18)]


def test_a_hole_after_admitted_records_of_the_same_partition() -> None:
    broker = FakeBroker(committed={A: 10})
    positions = make(broker)
    admission = admit(positions, recs(A, [10, 11, 15, 16, 12]))
    assert admission.admitted == [0, 1]
    assert admission.held == 3  # 15, 16 and even 12: the partition is stopped
    assert admission.ends == {A: 12}
    assert broker.seeks == [(A, 12)]


def test_a_hole_after_admitted_records_is_not_sought_again_within_reread_every() -> None:
    """The hole found in the batch that also admitted records before it is re-read once
    per ``reread_every`` like any other.

    ``done`` pops ``_rereads[tp]`` for every partition in ``ends``, including the re-read
    that ``admit`` started for a hole later in the same batch, so the next batch seeks
    again at once (and that first seek never counts towards ``give_up_after``).
    """
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0)
    admission = admit(positions, recs(A, [10, 11, 15]))
    assert broker.seeks == [(A, 12)]
    positions.done(admission)
    clock.now = 0.1  # records fetched before the seek are still arriving
    admit(positions, recs(A, [16, 17]))
    assert broker.seeks == [(A, 12)]


def test_a_hole_never_filled_is_taken_as_real(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=3)
    for attempt in range(3):
        clock.now = float(attempt)
        admission = admit(positions, recs(A, [15, 16]))
        assert admission.admitted == []
        assert admission.held == 2
    assert broker.seeks == [(A, 10)] * 3
    assert positions.rereads == 3

    clock.now = 3.0
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, recs(A, [15, 16]))
    assert admission.admitted == [0, 1]
    assert admission.held == 0
    assert admission.ends == {A: 17}
    assert broker.seeks == [(A, 10)] * 3  # no further seek
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "offsets 10-14 never arrived in 3 re-reads" in errors[0].getMessage()
    assert "continuing at 15" in errors[0].getMessage()
    positions.done(admission)
    assert positions.position(A, 1) == 17


def test_seeks_within_reread_every_do_not_count_towards_giving_up() -> None:
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=1)
    admit(positions, recs(A, [15]))
    for now in (0.2, 0.5, 0.9):
        clock.now = now
        assert admit(positions, recs(A, [15])).held == 1
    assert broker.seeks == [(A, 10)]
    clock.now = 1.0
    assert admit(positions, recs(A, [15])).admitted == [0]


# -- retention ---------------------------------------------------------------------------


def test_records_deleted_by_retention_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(committed={A: 5}, earliest={A: 8})
    positions = make(broker)
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, recs(A, [8, 9]))
    assert admission.admitted == [0, 1]
    assert admission.ends == {A: 10}
    assert admission.held == 0
    assert broker.seeks == []
    assert positions.position(A, 1) == 8  # moved to the earliest offset before done
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "raw[0]: offsets 5-7 were deleted by retention before this group read them; continuing at 8"
    ]
    positions.done(admission)
    assert positions.position(A, 1) == 10


def test_retention_then_a_hole_past_the_earliest_offset_is_read_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = FakeBroker(committed={A: 5}, earliest={A: 8})
    clock = Clock(0.0)
    positions = make(broker, clock)
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, recs(A, [12, 13]))
    assert admission.admitted == []
    assert admission.held == 2
    assert positions.position(A, 1) == 8
    assert broker.seeks == [(A, 8)]
    assert any("deleted by retention" in m for m in caplog.messages)
    assert any("offset 12 arrived while 8 was next" in m for m in caplog.messages)

    clock.now = 0.5
    admission = admit(positions, recs(A, range(8, 14)))
    assert admission.admitted == list(range(6))
    assert admission.ends == {A: 14}


def test_retention_during_a_run_moves_a_known_position() -> None:
    broker = FakeBroker(committed={A: 0})
    positions = make(broker)
    positions.done(admit(positions, recs(A, [0, 1])))
    broker.earliest_offsets[A] = 6
    admission = admit(positions, recs(A, [6, 7]))
    assert admission.admitted == [0, 1]
    assert broker.seeks == []
    positions.done(admission)
    assert positions.position(A, 1) == 8


# -- consumer generations ----------------------------------------------------------------


def test_records_of_another_generation_are_passed_over() -> None:
    broker = FakeBroker(committed={A: 0, B: 0})
    positions = make(broker)
    batch = [(A, 0, 1), (B, 0, 2), (A, 0, 2), (A, 1, 1), (B, 1, 2)]
    admission = admit(positions, batch, generation=2)
    assert admission.admitted == [1, 2, 4]
    assert admission.repeated == 2
    assert admission.held == 0
    assert admission.ends == {B: 2, A: 1}
    assert admission.generation == 2


def test_a_partition_only_of_an_old_generation_is_not_looked_up() -> None:
    broker = FakeBroker(committed={A: 0})
    positions = make(broker)
    admission = admit(positions, recs(A, [0, 1], generation=1), generation=2)
    assert admission.admitted == []
    assert admission.repeated == 2
    assert admission.ends == {}
    assert broker.committed_asked == []
    assert positions.position(A, 2) is None


def test_positions_are_per_generation() -> None:
    broker = FakeBroker(committed={A: 0, B: 0})
    positions = make(broker)
    positions.done(admit(positions, recs(A, range(10)) + recs(B, range(4)), generation=1))
    assert positions.committable([A, B], 1) == {A: 10, B: 4}

    # A rebalance: the new generation knows nothing of the old positions...
    assert positions.position(A, 2) is None
    assert positions.committable([A, B], 2) == {}

    # ...and starts again from what the group committed, not the old position.
    broker.committed_offsets[A] = 7
    admission = admit(positions, recs(A, range(7, 12), generation=2), generation=2)
    assert admission.admitted == [0, 1, 2, 3, 4]
    assert admission.repeated == 0
    assert broker.committed_asked[-1] == {A}
    assert positions.committable([A, B], 2) == {A: 7}
    positions.done(admission)
    assert positions.committable([A, B], 2) == {A: 12}
    assert positions.position(A, 1) is None  # the old generation's position is gone
    assert positions.committable([A, B], 1) == {B: 4}


def test_a_reread_of_an_old_generation_does_not_hold_back_a_new_seek() -> None:
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0)
    admit(positions, recs(A, [15]), generation=1)
    assert broker.seeks == [(A, 10)]
    clock.now = 0.1
    admission = admit(positions, recs(A, [15], generation=2), generation=2)
    assert admission.held == 1
    assert broker.seeks == [(A, 10), (A, 10)]


# -- unsticking --------------------------------------------------------------------------


def test_a_stuck_partition_is_read_again(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(committed={A: 0, B: 0, C: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    positions.done(admit(positions, recs(A, range(3)) + recs(B, range(3)) + recs(C, range(3))))
    highwaters = {A: 10, B: 3, C: 10}  # A and C have records past their positions

    clock.now = 3.0
    positions.done(admit(positions, recs(C, [3])))  # C makes progress
    clock.now = 4.9
    unstick(positions, highwaters)
    assert broker.seeks == []

    clock.now = 5.0
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        unstick(positions, highwaters)
    assert broker.seeks == [(A, 3)]  # not B (at its highwater), not C (moved at 3.0)
    assert positions.rereads == 1
    assert (
        "raw[0]: nothing processed for 5s though offsets 3-9 are in the log; reading again from 3"
    ) in caplog.messages

    clock.now = 8.0
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (C, 4)]  # C's turn, 5s after its progress

    clock.now = 9.9
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (C, 4)]  # not again before another stuck_after

    clock.now = 10.0
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (C, 4), (A, 3)]
    assert positions.rereads == 3


def test_unstick_ignores_unknown_partitions_and_highwaters() -> None:
    broker = FakeBroker(committed={A: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    positions.done(admit(positions, recs(A, [0])))
    clock.now = 100.0
    unstick(positions, {A: None, B: 50})
    unstick(positions, {A: 1})
    unstick(positions, {A: 10}, generation=2)
    assert broker.seeks == []


def test_a_partition_reaching_its_highwater_restarts_the_stuck_clock() -> None:
    broker = FakeBroker(committed={A: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    positions.done(admit(positions, recs(A, [0, 1])))
    clock.now = 10.0
    unstick(positions, {A: 2})  # caught up: nothing stuck
    clock.now = 14.0
    unstick(positions, {A: 5})  # new records, only 4s since it was caught up
    assert broker.seeks == []
    clock.now = 15.0
    unstick(positions, {A: 5})
    assert broker.seeks == [(A, 2)]


def test_the_unstick_reread_then_arrives() -> None:
    broker = FakeBroker(committed={A: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0, reread_every=1.0)
    positions.done(admit(positions, recs(A, [0, 1])))
    clock.now = 5.0
    unstick(positions, {A: 4})
    assert broker.seeks == [(A, 2)]
    clock.now = 5.2
    admission = admit(positions, recs(A, [2, 3]))
    assert admission.admitted == [0, 1]
    positions.done(admission)
    assert positions.position(A, 1) == 4
    assert positions._rereads == {}


# -- Faust consumer patches --------------------------------------------------------------


class FakeConsumer:
    """The Faust consumer attributes :func:`commit_positions_only` touches."""

    def __init__(self, last_committed: dict[TP, int]) -> None:
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._gap: dict[TP, list[int]] = {}
        self.last_committed = last_committed
        self._filter_committable_offsets: Callable[[Any], dict[TP, int]] | None = None

    def _should_commit(self, tp: TP, offset: int) -> bool:
        return offset > self.last_committed.get(tp, -1)


def test_commit_positions_only() -> None:
    broker = FakeBroker(committed={A: 0, B: 0, C: 0})
    positions = make(broker)
    positions.done(admit(positions, recs(A, range(5)) + recs(B, range(3))))
    consumer = FakeConsumer(last_committed={B: 3})
    for tp in (A, B, C):
        consumer._acked[tp].extend([1, 2, 3])
        consumer._acked_index[tp].update({1, 2, 3})
        consumer._gap[tp] = [7]
    generation = [1]
    commit_positions_only(consumer, positions, lambda: generation[0])
    committable = consumer._filter_committable_offsets
    assert committable is not None

    # B is not past what was committed already; C has no position.
    assert committable(iter([A, B, C])) == {A: 5}
    for tp in (A, B, C):
        assert consumer._acked[tp] == []
        assert consumer._acked_index[tp] == set()
    assert consumer._gap == {}

    # Only the partitions asked about are emptied.
    consumer._acked[A].append(5)
    consumer._gap[A] = [9]
    consumer._acked[B].append(5)
    consumer._gap[B] = [9]
    assert committable([B]) == {}
    assert consumer._acked[A] == [5] and consumer._gap == {A: [9]}
    assert consumer._acked[B] == []

    # After a rebalance the old generation's positions are never committed.
    generation[0] = 2
    assert committable([A, B, C]) == {}
    positions.done(admit(positions, recs(C, [0, 1], generation=2), generation=2))
    assert committable([A, B, C]) == {C: 2}


class FakeFaustConsumer:
    def __init__(self) -> None:
        self._read_offset: Any = defaultdict(lambda: None)


def test_deliver_every_record_forgets_the_raw_topic() -> None:
    consumer = FakeFaustConsumer()
    deliver_every_record(consumer, RAW)
    read_offset = consumer._read_offset
    other = TP("other", 0)
    other2 = TP("other", 1)

    read_offset[A] = 12
    read_offset[other] = 7
    assert read_offset[A] is None
    assert read_offset[B] is None
    assert read_offset[other] == 7
    assert read_offset[other2] is None  # like Faust's defaultdict(lambda: None)
    assert read_offset.get(A) is None
    assert read_offset.get(other) == 7
    assert set(read_offset) == {other}
    assert len(read_offset) == 1

    read_offset.update({B: 3, other2: 4})
    assert read_offset[B] is None
    assert read_offset[other2] == 4
    assert dict(read_offset.items()) == {other: 7, other2: 4}

    assert read_offset.pop(A, None) is None
    assert read_offset.pop(other, None) == 7
    assert read_offset[other] is None
    assert read_offset.pop(other, None) is None
    assert dict(read_offset.items()) == {other2: 4}
    read_offset[other2] = None
    assert read_offset[other2] is None
    del read_offset[other2]
    assert len(read_offset) == 0

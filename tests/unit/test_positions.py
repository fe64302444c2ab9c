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
    """Answers from ``committed_offsets``/``earliest_offsets``/``first_offsets``; records
    every seek and every question.

    ``first_offset`` answers ``first_offsets[tp]`` where set (None included), else the
    offset asked about (the record is in the log, as it is in the raw topic).
    """

    def __init__(
        self,
        committed: Mapping[TP, int | None] | None = None,
        earliest: Mapping[TP, int] | None = None,
        first: Mapping[TP, int | None] | None = None,
    ) -> None:
        self.committed_offsets: dict[TP, int | None] = dict(committed or {})
        self.earliest_offsets: dict[TP, int] = dict(earliest or {})
        self.first_offsets: dict[TP, int | None] = dict(first or {})
        self.seeks: list[tuple[TP, int]] = []
        self.committed_asked: list[set[TP]] = []
        self.first_offset_asked: list[tuple[TP, int]] = []

    async def committed(self, tps: Collection[TP]) -> Mapping[TP, int | None]:
        self.committed_asked.append(set(tps))
        return {tp: self.committed_offsets.get(tp) for tp in tps}

    async def earliest(self, tps: Collection[TP]) -> Mapping[TP, int]:
        return {tp: self.earliest_offsets.get(tp, 0) for tp in tps}

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def first_offset(self, tp: TP, offset: int) -> int | None:
        self.first_offset_asked.append((tp, offset))
        return self.first_offsets.get(tp, offset)


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


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


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
    assert positions.committable(1) == {A: 10, B: 20, C: 30}

    positions.done(admission)
    assert positions.position(A, 1) == 13
    assert positions.position(B, 1) == 22
    assert positions.position(C, 1) == 31
    assert positions.committable(1) == {A: 13, B: 22, C: 31}
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
    assert positions.committable(1) == {}


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
    assert positions.committable(1) == {A: 10, B: 2}

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
    assert broker.first_offset_asked == []

    # A new hole at the new position is sought at once.
    clock.now = 101.3
    admission = admit(positions, recs(A, [20]))
    assert admission.held == 1
    assert broker.seeks == [(A, 10), (A, 10), (A, 18)]


def test_reread_records_later_in_the_same_batch_are_admitted() -> None:
    """Expected 12, batch [15, 16, 12, 13]: the stale 15 and 16 are held, the re-read 12
    and 13 behind them admitted, with one seek."""
    broker = FakeBroker(committed={A: 12})
    clock = Clock(0.0)
    positions = make(broker, clock)
    admission = admit(positions, recs(A, [15, 16, 12, 13]))
    assert admission.admitted == [2, 3]
    assert admission.held == 2
    assert admission.repeated == 0
    assert admission.ends == {A: 14}
    assert broker.seeks == [(A, 12)]
    assert positions.rereads == 1
    positions.done(admission)
    assert positions.position(A, 1) == 14
    assert positions._rereads == {}  # the hole at 12 is filled

    # The rest of the re-read follows: no further seek.
    clock.now = 0.1
    admission = admit(positions, recs(A, range(14, 18)))
    assert admission.admitted == [0, 1, 2, 3]
    assert admission.ends == {A: 18}
    assert broker.seeks == [(A, 12)]


def test_a_hole_after_admitted_records_of_the_same_partition() -> None:
    broker = FakeBroker(committed={A: 10})
    positions = make(broker)
    admission = admit(positions, recs(A, [10, 11, 15, 16, 12, 9]))
    assert admission.admitted == [0, 1, 4]  # 10, 11, then the re-read 12
    assert admission.held == 2  # 15 and 16
    assert admission.repeated == 1  # 9
    assert admission.ends == {A: 13}
    assert broker.seeks == [(A, 12)]  # the hole is at 12, not the batch's start


def test_one_seek_per_partition_per_batch() -> None:
    """Only the first record past the expected offset starts a re-read: a second hole
    further on in the same batch is held without another seek (the first seek reads it
    again anyway)."""
    broker = FakeBroker(committed={A: 12, B: 0})
    positions = make(broker, reread_every=0.0)
    batch = recs(A, [15, 12, 13]) + recs(B, [3]) + recs(A, [20, 21, 14])
    admission = admit(positions, batch)
    assert admission.admitted == [1, 2, 6]  # A's 12, 13, 14
    assert admission.held == 4  # A's 15, 20, 21 and B's 3
    assert admission.ends == {A: 15}
    assert broker.seeks == [(A, 12), (B, 0)]
    assert positions.rereads == 2


def test_a_hole_after_admitted_records_is_not_sought_again_within_reread_every() -> None:
    """The hole found in the batch that also admitted records before it is re-read once
    per ``reread_every`` like any other: ``done`` keeps a re-read whose target it has
    not passed."""
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0)
    admission = admit(positions, recs(A, [10, 11, 15]))
    assert broker.seeks == [(A, 12)]
    positions.done(admission)
    clock.now = 0.1  # records fetched before the seek are still arriving
    admit(positions, recs(A, [16, 17]))
    assert broker.seeks == [(A, 12)]


def test_a_hole_the_broker_confirms_absent_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(committed={A: 10}, first={A: 15})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=3)
    for attempt in range(3):
        clock.now = float(attempt)
        admission = admit(positions, recs(A, [15, 16]))
        assert admission.admitted == []
        assert admission.held == 2
    assert broker.seeks == [(A, 10)] * 3
    assert positions.rereads == 3
    assert broker.first_offset_asked == []  # not before give_up_after re-reads

    clock.now = 3.0
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, recs(A, [15, 16]))
    assert broker.first_offset_asked == [(A, 10)]
    assert admission.admitted == [0, 1]
    assert admission.held == 0
    assert admission.ends == {A: 17}
    assert broker.seeks == [(A, 10)] * 3  # no further seek
    assert positions.rereads == 3
    assert errors(caplog) == [
        "raw[0]: offsets 10-14 are not in the log (the broker's first record from 10 is "
        "15: transaction markers or compaction); continuing at 15"
    ]
    assert positions.position(A, 1) == 15  # moved past the hole before done
    assert positions._rereads == {}
    positions.done(admission)
    assert positions.position(A, 1) == 17


def test_a_hole_confirmed_only_in_part_moves_to_the_first_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's first record from 10 is 12 but 15 came: only 10-11 are skipped; 15
    and 16 are held and the next batch reads again from 12."""
    broker = FakeBroker(committed={A: 10}, first={A: 12})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=1)
    admit(positions, recs(A, [15]))
    clock.now = 1.0
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        admission = admit(positions, recs(A, [15, 16]))
    assert admission.admitted == []
    assert admission.held == 2
    assert positions.position(A, 1) == 12
    assert broker.seeks == [(A, 10)]
    assert errors(caplog) == [
        "raw[0]: offsets 10-11 are not in the log (the broker's first record from 10 is "
        "12: transaction markers or compaction); continuing at 12"
    ]

    clock.now = 1.1  # a new hole: sought at once, its count starting afresh
    admission = admit(positions, recs(A, [17]))
    assert admission.held == 1
    assert broker.seeks == [(A, 10), (A, 12)]
    assert broker.first_offset_asked == [(A, 10)]
    clock.now = 1.2
    admission = admit(positions, recs(A, range(12, 18)))
    assert admission.admitted == list(range(6))
    assert admission.ends == {A: 18}


@pytest.mark.parametrize("first", [10, None], ids=["present", "unreadable"])
def test_a_hole_the_broker_does_not_confirm_is_never_skipped(
    caplog: pytest.LogCaptureFixture, first: int | None
) -> None:
    broker = FakeBroker(committed={A: 10}, first={A: first})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=2)
    with caplog.at_level(logging.WARNING, logger="processors.positions"):
        for attempt in range(6):
            clock.now = float(attempt)
            admission = admit(positions, recs(A, [15, 16]))
            assert admission.admitted == []
            assert admission.held == 2
            assert admission.ends == {}
            assert positions.position(A, 1) == 10
    assert broker.seeks == [(A, 10)] * 6  # it keeps reading again
    assert positions.rereads == 6
    assert broker.first_offset_asked == [(A, 10)] * 4  # each re-read past give_up_after
    assert errors(caplog) == [
        "raw[0]: offset 10 is in the log but 2 re-reads have not delivered it; still trying "
        "(nothing of this partition is committed past it)"
    ]

    # At last the re-read delivers it.
    clock.now = 6.5
    admission = admit(positions, recs(A, range(10, 17)))
    assert admission.admitted == list(range(7))
    positions.done(admission)
    assert positions.position(A, 1) == 17
    assert positions._rereads == {}


def test_seeks_within_reread_every_do_not_count_towards_giving_up() -> None:
    broker = FakeBroker(committed={A: 10}, first={A: 15})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=1)
    admit(positions, recs(A, [15]))
    for now in (0.2, 0.5, 0.9):
        clock.now = now
        assert admit(positions, recs(A, [15])).held == 1
    assert broker.seeks == [(A, 10)]
    assert broker.first_offset_asked == []
    clock.now = 1.0
    assert admit(positions, recs(A, [15])).admitted == [0]
    assert broker.first_offset_asked == [(A, 10)]


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
    assert broker.first_offset_asked == []


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


def test_retention_then_the_reread_later_in_the_same_batch() -> None:
    broker = FakeBroker(committed={A: 5}, earliest={A: 8})
    positions = make(broker)
    admission = admit(positions, recs(A, [12, 8, 9]))
    assert admission.admitted == [1, 2]
    assert admission.held == 1
    assert admission.ends == {A: 10}
    assert broker.seeks == [(A, 8)]


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
    assert positions.committable(1) == {A: 10, B: 4}

    # A rebalance: the new generation knows nothing of the old positions...
    assert positions.position(A, 2) is None
    assert positions.committable(2) == {}

    # ...and starts again from what the group committed, not the old position.
    broker.committed_offsets[A] = 7
    admission = admit(positions, recs(A, range(7, 12), generation=2), generation=2)
    assert admission.admitted == [0, 1, 2, 3, 4]
    assert admission.repeated == 0
    assert broker.committed_asked[-1] == {A}
    assert positions.committable(2) == {A: 7}
    positions.done(admission)
    assert positions.committable(2) == {A: 12}
    assert positions.position(A, 1) is None  # the old generation's position is gone
    assert positions.committable(1) == {B: 4}


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


def test_unstick_ignores_missing_and_empty_highwaters() -> None:
    broker = FakeBroker(committed={A: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    positions.done(admit(positions, recs(A, [0])))
    for now in (100.0, 200.0):
        clock.now = now
        unstick(positions, {A: None, B: 0, C: None})
        unstick(positions, {A: 1})  # at its highwater
    assert broker.seeks == []
    assert broker.committed_asked == [{A}]  # B and C never looked up
    assert positions.position(B, 1) is None and positions.position(C, 1) is None


def test_unstick_establishes_an_unknown_partition_after_stuck_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records skipped before any record of this generation arrived: the partition is
    never looked up by ``admit``, so ``unstick`` looks it up, then reads it again once
    it is stuck."""
    broker = FakeBroker(committed={A: 3, B: None}, earliest={B: 2})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    highwaters: dict[TP, int | None] = {A: 10, B: 6}

    unstick(positions, highwaters)  # first seen unknown
    clock.now = 4.9
    unstick(positions, highwaters)
    assert broker.committed_asked == []
    assert positions.committable(1) == {}

    clock.now = 5.0
    with caplog.at_level(logging.INFO, logger="processors.positions"):
        unstick(positions, highwaters)
    assert positions.position(A, 1) == 3  # committed
    assert positions.position(B, 1) == 2  # nothing committed: the earliest offset
    assert positions.committable(1) == {A: 3, B: 2}
    assert broker.seeks == []  # established, not sought
    assert "raw[0]: processing from offset 3" in caplog.messages
    assert "raw[1]: processing from offset 2" in caplog.messages
    assert positions.rereads == 0

    clock.now = 9.9
    unstick(positions, highwaters)
    assert broker.seeks == []

    clock.now = 10.0
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (B, 2)]
    assert positions.rereads == 2
    clock.now = 14.9
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (B, 2)]  # not again before another stuck_after
    clock.now = 15.0
    unstick(positions, highwaters)
    assert broker.seeks == [(A, 3), (B, 2), (A, 3), (B, 2)]

    # The re-read arrives.
    admission = admit(positions, recs(A, range(3, 10)))
    assert admission.admitted == list(range(7))
    positions.done(admission)
    assert positions.position(A, 1) == 10
    assert broker.committed_asked == [{A}, {B}]  # looked up once each


def test_unstick_establishing_a_caught_up_partition_never_seeks() -> None:
    broker = FakeBroker(committed={A: 10})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    for now in (0.0, 5.0, 10.0, 15.0, 100.0):
        clock.now = now
        unstick(positions, {A: 10})
    assert positions.position(A, 1) == 10
    assert broker.seeks == []


def test_unstick_unknown_partition_wait_restarts_at_a_new_generation() -> None:
    broker = FakeBroker(committed={A: 3})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    unstick(positions, {A: 10}, generation=1)
    clock.now = 4.0
    unstick(positions, {A: 10}, generation=2)  # first seen unknown in generation 2
    clock.now = 5.0
    unstick(positions, {A: 10}, generation=2)
    assert broker.committed_asked == []
    assert positions.position(A, 2) is None
    clock.now = 9.0
    unstick(positions, {A: 10}, generation=2)
    assert broker.committed_asked == [{A}]
    assert positions.position(A, 2) == 3
    assert positions.position(A, 1) is None


def test_unstick_of_a_partition_admit_found_meanwhile_is_the_usual_one() -> None:
    broker = FakeBroker(committed={A: 0})
    clock = Clock(0.0)
    positions = make(broker, clock, stuck_after=5.0)
    unstick(positions, {A: 10})  # first seen unknown
    clock.now = 2.0
    positions.done(admit(positions, recs(A, [0, 1])))
    clock.now = 5.0
    unstick(positions, {A: 10})  # known since 2.0: only 3s without progress
    assert broker.seeks == []
    assert broker.committed_asked == [{A}]
    clock.now = 7.0
    unstick(positions, {A: 10})
    assert broker.seeks == [(A, 2)]


def test_unstick_does_not_consume_the_give_up_count() -> None:
    broker = FakeBroker(committed={A: 10}, first={A: 15})
    clock = Clock(0.0)
    positions = make(broker, clock, reread_every=1.0, give_up_after=2, stuck_after=5.0)
    admission = admit(positions, recs(A, [15]))  # the hole: re-read 1
    assert admission.held == 1
    assert broker.seeks == [(A, 10)]
    assert positions._rereads[A].count == 1

    # Nothing comes; the partition is read again by unstick, many times.
    for now in (5.0, 10.0, 15.0, 20.0):
        clock.now = now
        unstick(positions, {A: 16})
    assert broker.seeks == [(A, 10)] * 5
    assert positions.rereads == 5
    assert positions._rereads[A].count == 1
    assert broker.first_offset_asked == []

    # The hole is seen again: its second re-read, not a give-up.
    clock.now = 20.5
    admission = admit(positions, recs(A, [15]))
    assert admission.held == 1
    assert broker.seeks == [(A, 10)] * 6
    assert broker.first_offset_asked == []

    # Only after give_up_after hole re-reads is the broker asked (and here confirms).
    clock.now = 21.5
    admission = admit(positions, recs(A, [15]))
    assert broker.first_offset_asked == [(A, 10)]
    assert admission.admitted == [0]
    assert broker.seeks == [(A, 10)] * 6


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
    clock.now = 20.0
    unstick(positions, {A: 4})  # caught up
    assert broker.seeks == [(A, 2)]


# -- Faust consumer patches --------------------------------------------------------------


class FakeConsumer:
    """The Faust consumer attributes :func:`commit_positions_only` touches."""

    def __init__(self, last_committed: dict[TP, int]) -> None:
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._gap: defaultdict[TP, list[int]] = defaultdict(list)
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
        consumer._gap[tp].append(7)
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

    # Every partition's bookkeeping is emptied, whichever partitions Faust names.
    consumer._acked[A].append(5)
    consumer._acked_index[A].add(5)
    consumer._gap[A].append(9)
    consumer._acked[B].append(5)
    consumer._gap[B].append(9)
    consumer.last_committed[A] = 5
    assert committable([B]) == {}
    assert consumer._acked[A] == [] and consumer._acked[B] == []
    assert consumer._acked_index[A] == set()
    assert consumer._gap == {}

    # After a rebalance the old generation's positions are never committed.
    generation[0] = 2
    assert committable([A, B, C]) == {}
    positions.done(admit(positions, recs(C, [0, 1], generation=2), generation=2))
    assert committable([A, B, C]) == {C: 2}


def test_commit_covers_positions_faust_does_not_name() -> None:
    """At a rebalance Faust has already forgotten the revoked partitions: their
    positions are committed all the same."""
    broker = FakeBroker(committed={A: 0, B: 0, C: 4})
    positions = make(broker)
    positions.done(admit(positions, recs(A, range(3)) + recs(B, range(2))))
    admit(positions, recs(C, [7]))  # C known (at 4) but nothing of it done
    consumer = FakeConsumer(last_committed={})
    consumer._acked[A].append(2)
    commit_positions_only(consumer, positions, lambda: 1)
    committable = consumer._filter_committable_offsets
    assert committable is not None
    assert B not in consumer._acked and C not in consumer._acked
    assert committable([A]) == {A: 3, B: 2, C: 4}
    assert committable([]) == {A: 3, B: 2, C: 4}
    consumer.last_committed.update({A: 3, B: 2, C: 4})
    assert committable([]) == {}


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

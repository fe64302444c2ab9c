"""``processors.state``: the local copy of the processor's state (real SQLite files)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from chargify_stream.processors.state import Slot, Store, bucket_seconds, dedup_record, parse_dedup

DAY = 24 * 3600


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_dedup_keys_are_answered_across_buckets(tmp_path: Path) -> None:
    store = Store(tmp_path, 7 * DAY)
    now = time.time()
    store.apply(seen=[(now, [5, 9, 2**62]), (now - 3 * DAY, [6, 9])])
    assert store.seen({5, 6, 7, 9, 2**62}) == {5, 6, 9, 2**62}
    assert store.seen(set()) == set()
    assert store.added == 5


def test_expiry_deletes_whole_buckets_past_the_window(tmp_path: Path) -> None:
    clock = Clock(1_000 * DAY)
    store = Store(tmp_path, 7 * DAY, clock=clock)
    assert bucket_seconds(7 * DAY) == DAY
    store.apply(seen=[(clock.now - 6 * DAY, [1]), (clock.now, [2])])
    assert len(list(tmp_path.glob("seen-*.sqlite"))) == 2
    assert store.expire() == 0
    clock.now += 2 * DAY  # "old" is now 8 days old: its whole bucket is past the window
    assert store.seen({1, 2}) == {2}
    started = time.perf_counter()
    assert store.expire() == 1
    assert time.perf_counter() - started < 0.1
    assert len(list(tmp_path.glob("seen-*.sqlite"))) == 1
    # Entries already past the window (a changelog read late) are not stored at all.
    store.apply(seen=[(clock.now - 9 * DAY, [3])])
    assert len(list(tmp_path.glob("seen-*.sqlite"))) == 1


def test_references_and_positions_survive_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path, DAY)
    assert store.reference(0, "77") is None  # cached as unknown ...
    store.apply(
        references={(0, "77"): "cust-77", (1, "78"): "cust-78"},
        seen=[(time.time(), [41])],
        positions={("refs", 0): 5, ("dedup", 0): 3},
    )
    assert store.reference(0, "77") == "cust-77"  # ... and learnt
    store.apply(references={(0, "77"): "moved"}, positions={("refs", 0): 4})
    assert store.reference(0, "77") == "moved"
    assert store.position("refs", 0) == 5  # a position never goes back
    store.close()
    again = Store(tmp_path, DAY)
    assert again.reference(0, "77") == "moved"
    assert again.reference(0, "78") is None  # another partition's
    assert again.reference(1, "78") == "cust-78"
    assert again.seen({41, 42}) == {41}
    assert (again.position("refs", 0), again.position("dedup", 0), again.position("x", 0)) == (
        5,
        3,
        None,
    )


def test_changelog_values_round_trip() -> None:
    at, keys = parse_dedup(dedup_record(12.5, [5, 2**62, 7]))
    assert (at, list(keys)) == (12.5, [5, 2**62, 7])
    assert list(parse_dedup(b"too short")[1]) == []


_HOLD = (
    "import sys, time; from processors.state import Slot; held = Slot(sys.argv[1]); "
    "print('held', flush=True); time.sleep(30)"
)


def test_each_live_worker_gets_its_own_slot(tmp_path: Path) -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        mine = Slot(tmp_path)
        assert mine.number == 1  # slot 0 is held by the other process
        mine.release()
    finally:
        other.kill()
        other.wait()
        if other.stdout is not None:
            other.stdout.close()
    again = Slot(tmp_path)
    assert again.number == 0  # free again once its holder is gone
    again.release()


def test_each_bucket_is_asked_only_for_keys_within_its_ranges(tmp_path: Path) -> None:
    """Ranges per key kind narrow what is asked of each bucket, never what is found."""
    store = Store(tmp_path, 7 * DAY)
    now = time.time()
    old = [4 * i + 1 for i in (100, 150, 200)] + [4 * 9_000 + 3]  # webhook and transaction ids
    new = [4 * i + 1 for i in (300, 301)] + [4 * 9_500 + 2]  # and an event id
    store.apply(seen=[(now - 3 * DAY, old), (now, new)])
    asked = {*old, *new, 4 * 150 + 2, 4 * 160 + 1, 4 * 9_001 + 3, 4 * 400 + 1}
    assert store.seen(asked) == {*old, *new}
    store.close()
    again = Store(tmp_path, 7 * DAY)  # the ranges are kept with the state
    assert again.seen(asked) == {*old, *new}
    again.close()
    # A bucket file whose ranges are missing is asked for every key.
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    with conn:
        conn.execute("DELETE FROM ranges")
    conn.close()
    unranged = Store(tmp_path, 7 * DAY)
    assert unranged.seen(asked) == {*old, *new}
    unranged.apply(seen=[(now, [4 * 500 + 1])])
    assert unranged.seen({*asked, 4 * 500 + 1}) == {*old, *new, 4 * 500 + 1}

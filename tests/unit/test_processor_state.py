"""The tables' explicit-partition writes, the dedup index and its expiry, on a fake table."""

from __future__ import annotations

from typing import Any

from processors.state import References, SeenWebhooks, Tables


class FakeTable:
    """What ``processors.state`` uses of a Faust table: ``data`` and ``send_changelog``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.changelog: list[tuple[int, str, Any]] = []

    def send_changelog(self, partition: int, key: str, value: Any, **_: Any) -> None:
        self.changelog.append((partition, key, value))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_references_are_written_to_the_raw_partition() -> None:
    table = FakeTable()
    refs = References(table)  # type: ignore[arg-type]
    refs.learn({(2, "77"): "cust-77", (0, "78"): "cust-78"})
    assert table.changelog == [(2, "77", "cust-77"), (0, "78", "cust-78")]
    assert refs.reference("77") == "cust-77" and refs.reference("79") is None
    assert len(refs) == 2


def test_seen_webhooks_one_entry_per_partition_and_batch() -> None:
    table, clock = FakeTable(), Clock(1000.0)
    seen = SeenWebhooks(table, window_s=60, clock=clock)  # type: ignore[arg-type]
    seen.remember({0: ["1", "2"], 2: ["3"]}, {0: 10, 2: 4})
    assert table.changelog == [
        (0, "0:10", {"at": 1000.0, "ids": ["1", "2"]}),
        (2, "2:4", {"at": 1000.0, "ids": ["3"]}),
    ]
    assert seen.seen("1") and seen.seen("3") and not seen.seen("4")
    assert len(seen) == 3
    clock.now = 1061.0  # older than the window: no longer a duplicate, even before expiry
    assert not seen.seen("1")


def test_expiry_tombstones_owned_partitions_and_forgets_the_rest() -> None:
    table, clock = FakeTable(), Clock(1000.0)
    seen = SeenWebhooks(table, window_s=60, clock=clock)  # type: ignore[arg-type]
    seen.remember({0: ["1"], 1: ["2"]}, {0: 0, 1: 0})
    clock.now = 1030.0
    seen.remember({0: ["3"]}, {0: 1})
    table.changelog.clear()
    clock.now = 1070.0
    assert seen.expire(active_partitions={0}) == 2
    assert table.changelog == [(0, "0:0", None)]  # partition 1 belongs to another worker
    assert set(table.data) == {"0:1"}
    assert (seen.seen("1"), seen.seen("2"), seen.seen("3")) == (False, False, True)
    assert len(seen) == 1


def test_the_index_is_rebuilt_from_the_table() -> None:
    table, clock = FakeTable(), Clock(1000.0)
    table.data = {
        "0:0": {"at": 990.0, "ids": ["1", "2"]},
        "1:5": {"at": 995.0, "ids": ["2", "3"]},
        "1:9": "not an entry",
    }
    seen = SeenWebhooks(table, window_s=60, clock=clock)  # type: ignore[arg-type]
    assert not seen.seen("1")
    seen.rebuild()
    assert all(seen.seen(w) for w in ("1", "2", "3"))
    assert seen.expire(active_partitions={0, 1}) == 1  # the unreadable entry
    assert len(seen) == 3


def test_tables_answer_as_the_splitter_state() -> None:
    refs_table, seen_table = FakeTable(), FakeTable()
    tables = Tables(
        References(refs_table),  # type: ignore[arg-type]
        SeenWebhooks(seen_table, window_s=60, clock=Clock(0.0)),  # type: ignore[arg-type]
    )
    tables.references.learn({(0, "1"): "c"})
    tables.webhooks.remember({0: ["9"]}, {0: 0})
    assert tables.reference("1") == "c" and tables.is_duplicate("9")

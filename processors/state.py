"""The worker's two Faust tables, written with an explicit changelog partition.

Both tables are partitioned like ``chargify.webhooks.raw``, which is keyed by subscription
id: every event of a subscription, and every retry of a webhook, arrives on the same
partition, so the worker that owns a raw partition owns the table entries learnt from it,
and Faust recovers exactly those entries (from the tables' changelog topics) when a worker
starts or partitions move.

Faust picks the changelog partition of ``table[key] = value`` from the event being
processed (``faust.streams.current_event()``), which is set only inside the task that
iterates the stream. The agent works on batches that span partitions, and writes only once
a batch's outputs are acknowledged, so every write here names the partition of the raw
record it came from: ``Table.send_changelog(partition, ...)`` plus the local store, which is
what ``Table.__setitem__`` does with the partition it derives.

- :class:`References`: subscription id -> customer reference, one entry per subscription.
- :class:`SeenWebhooks`: the webhook ids emitted within ``PROCESSOR_DEDUP_WINDOW_S``. One
  table entry per raw partition and batch (``"<partition>:<offset>"`` -> the time and the
  ids), not one per webhook, so remembering costs one changelog record per batch; an
  in-memory index (id -> time) answers the per-record question and is rebuilt from the
  table after every recovery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from faust.types import TableT

__all__ = ["References", "SeenWebhooks", "Tables"]

log = logging.getLogger(__name__)


def _write(table: TableT[Any, Any], partition: int, key: str, value: Any) -> None:
    table.send_changelog(partition, key, value)
    table.data[key] = value


def _delete(table: TableT[Any, Any], partition: int, key: str) -> None:
    # A tombstone, as Table.__delitem__ sends it.
    table.send_changelog(partition, key, None, value_serializer="raw")
    table.data.pop(key, None)


class References:
    """Subscription id -> customer reference, learnt from every event that carries both."""

    def __init__(self, table: TableT[Any, Any]) -> None:
        self.table = table

    def reference(self, subscription_id: str) -> str | None:
        value = self.table.data.get(subscription_id)
        return value if isinstance(value, str) else None

    def learn(self, learned: dict[tuple[int, str], str]) -> None:
        """Record (raw partition, subscription id) -> reference pairs."""
        for (partition, subscription_id), reference in learned.items():
            _write(self.table, partition, subscription_id, reference)

    def __len__(self) -> int:
        return len(self.table.data)


class SeenWebhooks:
    """Webhook ids emitted within the dedup window (see the module docstring)."""

    def __init__(
        self, table: TableT[Any, Any], window_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.table = table
        self.window_s = window_s
        self.clock = clock
        self._index: dict[str, float] = {}

    def seen(self, webhook_id: str) -> bool:
        at = self._index.get(webhook_id)
        return at is not None and at >= self.clock() - self.window_s

    def remember(self, emitted: dict[int, list[str]], offsets: dict[int, int]) -> None:
        """Record the ids emitted per raw partition; ``offsets`` names each partition's batch."""
        now = self.clock()
        for partition, ids in emitted.items():
            key = f"{partition}:{offsets[partition]}"
            _write(self.table, partition, key, {"at": now, "ids": ids})
            for webhook_id in ids:
                self._index[webhook_id] = now

    def rebuild(self) -> None:
        """Rebuild the index from the table (after a recovery)."""
        index: dict[str, float] = {}
        for value in self.table.data.values():
            at, ids = _entry(value)
            for webhook_id in ids:
                if index.get(webhook_id, 0.0) < at:
                    index[webhook_id] = at
        self._index = index
        log.info(
            "dedup index rebuilt: %d webhook ids in %d batches", len(index), len(self.table.data)
        )

    def expire(self, active_partitions: Collection[int]) -> int:
        """Forget entries older than the window; return how many batches were forgotten.

        Entries of partitions this worker owns get a tombstone on the changelog; others
        (left over from partitions that moved away) are only dropped from memory.
        """
        horizon = self.clock() - self.window_s
        old = []
        for key, value in list(self.table.data.items()):
            at, _ = _entry(value)
            if at < horizon:
                old.append(key)
        for key in old:
            partition = int(key.partition(":")[0])
            if partition in active_partitions:
                _delete(self.table, partition, key)
            else:
                self.table.data.pop(key, None)
        self._index = {k: at for k, at in self._index.items() if at >= horizon}
        return len(old)

    def __len__(self) -> int:
        return len(self._index)


def _entry(value: Any) -> tuple[float, Iterable[str]]:
    if isinstance(value, dict):
        try:
            return float(value.get("at", 0.0)), [str(i) for i in value.get("ids", ())]
        except (TypeError, ValueError):
            pass
    return 0.0, ()


class Tables:
    """Both tables, as :class:`processors.splitter.State`."""

    def __init__(self, references: References, webhooks: SeenWebhooks) -> None:
        self.references = references
        self.webhooks = webhooks

    def reference(self, subscription_id: str) -> str | None:
        return self.references.reference(subscription_id)

    def is_duplicate(self, webhook_id: str) -> bool:
        return self.webhooks.seen(webhook_id)

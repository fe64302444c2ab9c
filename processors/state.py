"""The worker's state: customer references and dedup keys, on disk, mirrored by changelogs.

Two kinds of state, both partitioned like ``chargify.webhooks.raw`` (keyed by subscription
id: every event of a subscription, every retry of a webhook and every delivery of a
Chargify event arrive on the same partition, so the worker that owns a raw partition owns
the state learnt from it):

- **references**: subscription id -> customer reference, one entry per subscription, for
  ``component_allocation_change`` (which names no customer). Changelog topic
  ``<PROCESSOR_APP_ID>-references-changelog``, compacted, key = subscription id.
- **dedup keys**: what was emitted within ``PROCESSOR_DEDUP_WINDOW_S``, as 64-bit integers
  (:func:`processors.splitter.dedup_keys`: a Chargify id and its kind). Changelog topic
  ``<PROCESSOR_APP_ID>-dedup-changelog``, one record per raw partition and batch (key: the
  batch's first raw offset; value: the time and the keys, packed), deleted by time
  (retention: the window plus one bucket), never compacted.

The changelog records are written by the pipeline in the same Kafka transaction as the
outputs and input offsets they belong to (:mod:`processors.pipeline`), so the changelogs
hold exactly the state of what was committed. This module keeps a local copy of them, for
lookups at memory speed and restarts without a replay:

- one SQLite file (``state.sqlite``) holds the references and, per changelog partition,
  the offset up to which the local copy has applied the changelog (``positions``);
- the dedup keys go to one SQLite file per time bucket
  (``seen-<bucket>.sqlite``, a bucket is a seventh of the window), so expiry is deleting
  the files wholly past the window: a few milliseconds, whatever their size (an expiry pass
  over a dict of ids once blocked the loop for seconds);
- a worker that is assigned a raw partition reads that partition's changelogs from the
  stored offset to their end (only the tail, when it owned it before) and applies them;
  nothing is held in memory but a bounded cache of references.

The store is written only after a transaction committed. A worker killed between the
commit and the local write leaves the local copy behind the changelog, and the stored
offset says so: the next assignment reads the difference again (applying is idempotent).

Each worker uses its own folder under ``PROCESSOR_DATA_DIR`` (``slot-<n>``), the first one
no other live process holds (a lock file), so several workers on one host do not share
files and a restarted worker finds its predecessor's copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import struct
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import suppress
from itertools import chain
from pathlib import Path
from typing import IO

__all__ = ["DEDUP", "REFERENCES", "Slot", "Store", "bucket_seconds", "dedup_record", "parse_dedup"]

log = logging.getLogger(__name__)

REFERENCES = "references"
DEDUP = "dedup"
BUCKETS_PER_WINDOW = 7
REFERENCE_CACHE_MAX = 500_000
_CHUNK = 10_000  # keys per IN query (SQLite allows 32,766 parameters)


def bucket_seconds(window_s: float) -> int:
    """The length of one dedup bucket: a seventh of the window (a day, for the default)."""
    return max(1, int(window_s // BUCKETS_PER_WINDOW))


def dedup_record(at: float, keys: Iterable[int]) -> bytes:
    """The changelog value of one batch's dedup keys: the time (a little-endian double),
    then each key (little-endian 64-bit integers)."""
    packed = array("q", keys)
    if sys.byteorder == "big":
        packed.byteswap()
    return struct.pack("<d", at) + packed.tobytes()


def parse_dedup(value: bytes) -> tuple[float, array[int]]:
    """``(time, keys)`` of a dedup changelog value; an unreadable one holds nothing."""
    if len(value) < 8 or (len(value) - 8) % 8:
        return 0.0, array("q")
    (at,) = struct.unpack_from("<d", value)
    keys = array("q", value[8:])
    if sys.byteorder == "big":
        keys.byteswap()
    return at, keys


class Slot:
    """This worker's folder under the data dir, held by a lock for the process's life."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        root = Path(data_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            handle: IO[bytes] = open(root / f"slot-{n}.lock", "ab")  # noqa: SIM115 - held
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                n += 1
                continue
            break
        self.number = n
        self.path = root / f"slot-{n}"
        self.path.mkdir(exist_ok=True)
        self._handle = handle

    def release(self) -> None:
        with suppress(OSError):
            self._handle.close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # The changelogs are the durable copy: a write lost in a power cut is read again.
    conn.execute("PRAGMA synchronous=OFF")
    return conn


class Store:
    """The local copy of the state (see the module docstring).

    ``clock`` is wall-clock seconds. Not thread-safe: the pipeline's thread owns it.
    """

    def __init__(
        self, folder: Path, window_s: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.folder = folder
        self.window_s = window_s
        self.bucket_s = bucket_seconds(window_s)
        self.clock = clock
        self._main = _connect(folder / "state.sqlite")
        self._main.executescript(
            """
            CREATE TABLE IF NOT EXISTS refs (
                partition INTEGER NOT NULL, subscription TEXT NOT NULL, reference TEXT NOT NULL,
                PRIMARY KEY (subscription, partition)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS positions (
                changelog TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
                PRIMARY KEY (changelog, partition)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS ranges (
                bucket INTEGER NOT NULL, kind INTEGER NOT NULL, lo INTEGER NOT NULL,
                hi INTEGER NOT NULL, PRIMARY KEY (bucket, kind)) WITHOUT ROWID;
            """
        )
        # Per bucket and key kind (key % 4), the lowest and highest key it may hold; a
        # bucket file found without them (none are written so) is asked for every key.
        self._ranges: dict[int, dict[int, tuple[int, int]]] = {}
        for bucket, kind, lo, hi in self._main.execute("SELECT * FROM ranges"):
            self._ranges.setdefault(bucket, {})[kind] = (lo, hi)
        self._unranged: set[int] = set()
        self._buckets: dict[int, sqlite3.Connection] = {}
        self._added = 0  # dedup keys added since start (a count(*) of 10M rows takes long)
        for file in sorted(folder.glob("seen-*.sqlite")):
            with suppress(ValueError):
                bucket = int(file.stem.removeprefix("seen-"))
                self._open_bucket(bucket)
                if bucket not in self._ranges:
                    self._unranged.add(bucket)
        self._references: dict[tuple[int, str], str | None] = {}

    # Positions --------------------------------------------------------------------------

    def position(self, changelog: str, partition: int) -> int | None:
        """The changelog offset the local copy has applied up to (exclusive), if any."""
        row = self._main.execute(
            "SELECT next_offset FROM positions WHERE changelog = ? AND partition = ?",
            (changelog, partition),
        ).fetchone()
        return None if row is None else int(row[0])

    def _advance(self, positions: Mapping[tuple[str, int], int]) -> None:
        self._main.executemany(
            "INSERT INTO positions VALUES (?, ?, ?) ON CONFLICT (changelog, partition) "
            "DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
            [
                (changelog, partition, offset)
                for (changelog, partition), offset in positions.items()
            ],
        )

    # References -------------------------------------------------------------------------

    def reference(self, partition: int, subscription_id: str) -> str | None:
        """The customer reference learnt for a subscription on a raw partition."""
        key = (partition, subscription_id)
        try:
            return self._references[key]
        except KeyError:
            pass
        row = self._main.execute(
            "SELECT reference FROM refs WHERE subscription = ? AND partition = ?",
            (subscription_id, partition),
        ).fetchone()
        found = None if row is None else str(row[0])
        if len(self._references) >= REFERENCE_CACHE_MAX:
            self._references.clear()
        self._references[key] = found
        return found

    def references(self) -> int:
        """How many subscriptions are known (for the metrics)."""
        return int(self._main.execute("SELECT count(*) FROM refs").fetchone()[0])

    # Dedup keys -------------------------------------------------------------------------

    def _bucket(self, at: float) -> int:
        return int(at // self.bucket_s)

    def _horizon(self) -> int:
        """The oldest bucket still (partly) inside the window."""
        return self._bucket(self.clock() - self.window_s)

    def _open_bucket(self, bucket: int) -> sqlite3.Connection:
        conn = self._buckets.get(bucket)
        if conn is None:
            conn = _connect(self.folder / f"seen-{bucket}.sqlite")
            conn.execute("CREATE TABLE IF NOT EXISTS seen (key INTEGER PRIMARY KEY)")
            self._buckets[bucket] = conn
        return conn

    def seen(self, keys: Collection[int]) -> set[int]:
        """Those of ``keys`` emitted within the window.

        Newest bucket first (a repeat is most often recent; keys found are not asked of
        older buckets), and only the keys within a bucket's range for their kind: Chargify's
        ids grow with time, so a new record's keys are past every older bucket's range, and
        only the current bucket is asked.
        """
        if not keys:
            return set()
        horizon = self._horizon()
        by_kind: dict[int, list[int]] = {}
        for key in keys:
            by_kind.setdefault(key & 3, []).append(key)
        for listed in by_kind.values():
            listed.sort()
        found: set[int] = set()
        for bucket in sorted(self._buckets, reverse=True):
            if bucket < horizon:
                break
            ranges = None if bucket in self._unranged else self._ranges.get(bucket, {})
            probe: list[int] = []
            for kind, listed in by_kind.items():
                if ranges is None:
                    probe.extend(listed)
                elif kind in ranges:
                    lo, hi = ranges[kind]
                    probe.extend(listed[bisect_left(listed, lo) : bisect_right(listed, hi)])
            probe = [key for key in probe if key not in found]
            conn = self._buckets[bucket]
            for start in range(0, len(probe), _CHUNK):
                chunk = probe[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in conn.execute(f"SELECT key FROM seen WHERE key IN ({marks})", chunk)
                )
        return found

    def expire(self) -> int:
        """Delete the buckets wholly past the window; return how many were deleted."""
        horizon = self._horizon()
        old = [bucket for bucket in self._buckets if bucket < horizon]
        if old:
            self._main.executemany("DELETE FROM ranges WHERE bucket = ?", [(b,) for b in old])
        for bucket in old:
            self._ranges.pop(bucket, None)
            self._unranged.discard(bucket)
            self._buckets.pop(bucket).close()
            for suffix in ("", "-wal", "-shm"):
                with suppress(FileNotFoundError):
                    os.remove(self.folder / f"seen-{bucket}.sqlite{suffix}")
        return len(old)

    # Writing ----------------------------------------------------------------------------

    def apply(
        self,
        *,
        references: Mapping[tuple[int, str], str] = {},
        seen: Iterable[tuple[float, Iterable[int]]] = (),
        positions: Mapping[tuple[str, int], int] = {},
    ) -> None:
        """Apply committed state: (partition, subscription) -> reference; (time, keys)
        dedup entries; then the changelog positions they reach."""
        horizon = self._horizon()
        grouped: dict[int, list[Iterable[int]]] = {}
        for at, keys in seen:
            bucket = self._bucket(at)
            if bucket >= horizon:
                grouped.setdefault(bucket, []).append(keys)
        rows_of = {bucket: sorted(chain.from_iterable(parts)) for bucket, parts in grouped.items()}
        # The ranges first: wider than a bucket's keys is harmless, narrower would hide some.
        self._widen(rows_of)
        for bucket, rows in rows_of.items():
            # In key order: appended to the b-tree, not scattered through it.
            conn = self._open_bucket(bucket)
            conn.execute("BEGIN")
            inserted = conn.executemany("INSERT OR IGNORE INTO seen VALUES (?)", zip(rows))
            self._added += inserted.rowcount
            conn.execute("COMMIT")
        self._main.execute("BEGIN")
        if references:
            self._main.executemany(
                "INSERT INTO refs VALUES (?, ?, ?) ON CONFLICT (subscription, partition) "
                "DO UPDATE SET reference = excluded.reference",
                [(p, sid, ref) for (p, sid), ref in references.items()],
            )
            for key, ref in references.items():
                if key in self._references:
                    self._references[key] = ref
        self._advance(positions)
        self._main.execute("COMMIT")

    def _widen(self, rows_of: Mapping[int, list[int]]) -> None:
        """Widen each bucket's per-kind key range to take ``rows_of[bucket]`` (sorted)."""
        changed = []
        for bucket, rows in rows_of.items():
            ranges = self._ranges.setdefault(bucket, {})
            if not rows:
                continue
            for kind in range(4):
                lowest = next((k for k in rows if k & 3 == kind), None)
                if lowest is None:
                    continue
                highest = next(k for k in reversed(rows) if k & 3 == kind)
                lo, hi = ranges.get(kind, (lowest, highest))
                wider = (min(lo, lowest), max(hi, highest))
                if ranges.get(kind) != wider:
                    ranges[kind] = wider
                    changed.append((bucket, kind, *wider))
        if changed:
            self._main.execute("BEGIN")
            self._main.executemany(
                "INSERT INTO ranges VALUES (?, ?, ?, ?) ON CONFLICT (bucket, kind) "
                "DO UPDATE SET lo = excluded.lo, hi = excluded.hi",
                changed,
            )
            self._main.execute("COMMIT")

    @property
    def added(self) -> int:
        """Dedup keys added since the worker started, restored ones included."""
        return self._added

    def close(self) -> None:
        for conn in self._buckets.values():
            conn.close()
        self._buckets.clear()
        self._main.close()

"""Where the machine's CPU went during a measurement, per process tree, from ``/proc``.

:func:`snapshot` reads every process's user+system ticks (all its threads) and the
machine's busy ticks; :func:`usage` turns two snapshots into cores used per label. A
process is labelled by its nearest ancestor among ``roots`` (so Postgres backends count
as ``postgres``, the stages' children as their stage), and everything else on the
machine as ``other`` (the other developers' work). Processes that exited between the two
snapshots are missing from both sides, except the benchmark's own reaped children (wrk),
whose time :func:`children_seconds` reports.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Snapshot:
    """Ticks per pid, each pid's parent, and the machine's busy ticks, at one moment."""

    ticks: dict[int, int] = field(default_factory=dict)
    parents: dict[int, int] = field(default_factory=dict)
    busy: int = 0


def snapshot() -> Snapshot:
    """Read ``/proc`` once."""
    snap = Snapshot()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        rest = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        snap.parents[pid] = int(rest[1])
        snap.ticks[pid] = int(rest[11]) + int(rest[12])
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
    snap.busy = user + nice + system + irq + softirq + steal
    return snap


def children_seconds() -> float:
    """CPU seconds of this process's reaped children so far (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _label(pid: int, parents: dict[int, int], roots: dict[int, str]) -> str:
    seen = 0
    while pid > 1 and seen < 64:
        if pid in roots:
            return roots[pid]
        pid = parents.get(pid, 0)
        seen += 1
    return "other"


def usage(
    before: Snapshot,
    after: Snapshot,
    roots: dict[int, str],
    seconds: float,
    extra: dict[str, float] | None = None,
) -> dict[str, float]:
    """Cores used per label between two snapshots ``seconds`` apart.

    ``extra`` adds CPU seconds measured otherwise (reaped children) under their own
    labels; they are taken out of ``other``. ``machine`` is the whole machine's busy
    time, so ``other`` is what the benchmark's processes do not account for.
    """
    out: dict[str, float] = {}
    for pid, ticks in after.ticks.items():
        if pid not in before.ticks:
            continue
        label = _label(pid, after.parents, roots)
        if label == "other":
            continue
        out[label] = out.get(label, 0.0) + (ticks - before.ticks[pid]) / TICK / seconds
    for label, cpu_seconds in (extra or {}).items():
        out[label] = out.get(label, 0.0) + cpu_seconds / seconds
    machine = (after.busy - before.busy) / TICK / seconds
    out["other"] = max(machine - sum(out.values()), 0.0)
    out["machine"] = machine
    return out

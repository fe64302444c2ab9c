"""Retry with backoff: the one schedule of pauses, and a loop that uses it.

Transient faults (the broker or the database away, a throttled API) are retried, never
turned into dead letters (``chargify_stream.base.errors``). The pause starts at ``first``,
doubles after every failure and stays at ``most``; with ``jitter`` each pause is drawn
from its upper half, so that several processes do not reconnect in step.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from chargify_stream.base.errors import ChargifyStreamError

__all__ = ["RetryStopped", "backoff", "retry"]

_T = TypeVar("_T")


class RetryStopped(ChargifyStreamError):
    """A stop was asked for while waiting to retry; the last failure is its cause."""


def backoff(first: float, most: float = math.inf, *, jitter: bool = False) -> Iterator[float]:
    """Pauses of ``first``, twice that, ... up to ``most`` (for ever)."""
    pause = first
    while True:
        yield pause * random.uniform(0.5, 1.0) if jitter else pause
        pause = min(pause * 2, most)


def retry(
    step: Callable[[], _T],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    first: float = 0.2,
    most: float = 5.0,
    jitter: bool = False,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> _T:
    """Run ``step`` until it returns without raising ``retry_on``.

    Before each pause ``on_retry(error, pause)`` is called (to log, count, reconnect).
    With ``stop``, the pause ends early when the event is set, raising
    :class:`RetryStopped` from the last error.
    """
    pauses = backoff(first, most, jitter=jitter)
    while True:
        try:
            return step()
        except retry_on as exc:
            pause = next(pauses)
            if on_retry is not None:
                on_retry(exc, pause)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                raise RetryStopped(f"stopped while retrying after: {exc}") from exc

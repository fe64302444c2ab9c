"""The processor process's lifecycle: start-up retries, failure exits and the stop watchdog.

- SIGTERM or SIGINT before the Faust worker handles signals itself (imports, topic
  preparation, the worker's start: several seconds on a busy host) stops the start, status
  0: nothing was read yet.
- A broker away while the topics are prepared is waited for (``START_ATTEMPTS`` tries with
  a growing pause), then the start gives up with status 1 for the supervisor.
- A pipeline failure that is not a bad record (those are dead-lettered) exits at once
  with status 1: nothing uncommitted counts, so the next owner of its partitions does the
  work again.
- A stop that is not done ``after`` seconds after it began is cut short: every thread's
  stack is printed and the process exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaException

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.retry import retry
from chargify_stream.base.settings import Settings

__all__ = [
    "START_ATTEMPTS",
    "StopRequested",
    "exit_early_on_signal",
    "exit_if_still_running",
    "exit_on_failure",
    "join",
    "partition_count",
    "retry_at_start",
]

log = logging.getLogger(__name__)

START_ATTEMPTS = 6
_T = TypeVar("_T")
# After the watchdog's own deadline: if even it cannot run (the main thread stuck in C with
# the GIL held), faulthandler's C thread dumps the stacks and exits.
_BACKSTOP_S = 5.0


class StopRequested(Exception):
    """A stop signal arrived before the worker handled signals itself."""


def exit_early_on_signal() -> None:
    """Until the worker installs its own handlers: a stop signal raises StopRequested."""

    def stop(signum: int, frame: object) -> None:
        raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def retry_at_start(what: str, call: Callable[[], _T], *, pause: float = 1.0) -> _T:
    """``call()``, again while the broker is away, ``START_ATTEMPTS`` times at most."""

    def waiting(exc: BaseException, wait: float, attempt: int) -> None:
        log.error(
            "%s failed (attempt %d of %d: %s; most often Kafka is unreachable); "
            "trying again in %.0fs",
            what,
            attempt,
            START_ATTEMPTS,
            exc,
            wait,
        )

    return retry(
        call,
        retry_on=(TransientError, KafkaException),
        first=pause,
        most=15.0,
        give_up=lambda _exc, attempt: attempt >= START_ATTEMPTS,
        on_retry=waiting,
    )


def partition_count(settings: Settings, topic: str) -> int:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(librdkafka_config(settings, log_level=0))
    metadata = admin.list_topics(topic, timeout=30).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    return len(metadata.partitions)


def exit_on_failure(exc: BaseException) -> None:
    """Exit at once, status 1, for the supervisor to start the worker again."""
    log.critical("processor stopped after a failure: %r", exc, exc_info=exc)
    logging.shutdown()
    os._exit(1)


async def join(thread: threading.Thread) -> None:
    """Wait for ``thread`` without blocking the event loop."""
    while thread.is_alive():
        await asyncio.to_thread(thread.join, 0.5)


def exit_if_still_running(after: float) -> Callable[[], None]:
    """Exit the process ``after`` seconds from now, if it is still there.

    Returns the function that calls it off. A thread, so that it fires even if the event
    loop is stuck; it prints every thread's stack first.
    """

    def cut_short() -> None:
        try:
            log.error(
                "the processor did not stop within %gs; exiting without finishing (what was "
                "not committed is done again by the group); the stacks follow",
                after,
            )
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(ValueError, OSError):
                    handler.flush()
            faulthandler.dump_traceback(all_threads=True)
            logging.shutdown()
        finally:
            os._exit(1)

    timer = threading.Timer(after, cut_short)
    timer.daemon = True
    timer.start()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr is no file
        faulthandler.dump_traceback_later(after + _BACKSTOP_S, exit=True)

    def call_off() -> None:
        timer.cancel()
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()

    return call_off

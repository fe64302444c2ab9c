"""The gateway's HTTP connections: uvicorn's httptools protocol with deadlines and a
lingering close. The one place the gateway bends uvicorn.

uvicorn has an idle keep-alive timeout, but nothing times out a client while it sends a
request: a connection that sends nothing, or a byte a second, stays open for ever, and
uvicorn's ``limit_concurrency`` counts it (999 such connections made every webhook 503).
So every connection here has one deadline at a time, absolute (a slow sender cannot
stretch it by sending a byte now and then):

=======  ==========================================  ===================================
phase    starts                                      must end within, else closed
=======  ==========================================  ===================================
headers  connection made; or, on a kept-alive        ``header_timeout_s``: the request's
         connection, the next request's first byte   headers complete
body     headers complete                            ``body_timeout_s``: the body complete
idle     an answer sent, request complete            ``keep_alive_s``: a next request begins
drain    an answer sent before the body was read     ``DRAIN_TIME_S`` and ``DRAIN_MAX_BYTES``
=======  ==========================================  ===================================

While the app handles a complete request there is no deadline: it answers within the
publish bound. uvicorn's own ``limit_concurrency`` is not used (the app bounds the
webhook requests and the bytes in flight itself); idle connections cost a few kB each
and are bounded by the deadlines and the open-files limit.

The drain is what well-behaved servers call a lingering close. When the app answers
before reading the whole body (413, 401 without a signature, 503 when full), closing at
once would leave unread bytes in the kernel, and closing a socket with unread data sends
a reset: a client still sending (Python's urllib sends ``Connection: close`` and reads
only once its body is out) sees that reset instead of the answer. So the rest of the
body is read and discarded, up to a bound, before the connection is closed (or kept, if
the client asked for keep-alive).

uvicorn names this module relies on (versions pinned in pyproject.toml; checked by
``tests/unit/test_connection.py`` against the real classes):

- ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``: its constructor
  ``(config, server_state, app_state, _loop)`` and the httptools parser callbacks it
  implements (``on_message_begin``, ``on_headers_complete``, ``on_body``,
  ``on_message_complete``), plus ``connection_made``, ``connection_lost`` and
  ``on_response_complete`` and ``data_received``, each extended here and always
  calling uvicorn's own;
- its attributes ``loop``, ``transport``, ``expect_100_continue`` (the current request
  asked for ``100 Continue``), ``cycle`` (the current request) and ``flow``
  (``FlowControl.pause_reading``: the rest of a body is read only once the app asks for
  it; uvicorn would read up to 64 KiB ahead per request, memory a crowd of refused
  uploads held);
- ``RequestResponseCycle.keep_alive``, ``.response_complete`` and ``.body``:
  ``keep_alive`` is set to True on every request so that the cycle never closes the
  connection itself after an answer; this protocol closes it once the request's body is
  over (the answer then lacks ``connection: close``, which a client that asked to close
  does not need). ``body``, what was read ahead and not taken by the app, is emptied
  when the rest of the body is to be discarded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["DRAIN_MAX_BYTES", "DRAIN_TIME_S", "Deadlines", "protocol_class", "raise_open_files"]

log = logging.getLogger(__name__)

# How much of a body answered early is read and discarded before closing, and for how
# long at most (nginx's lingering close reads for up to 30 s, 5 s between reads).
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_TIME_S = 5.0


@dataclass(frozen=True)
class Deadlines:
    """A connection's deadlines (seconds) and where to count connections dropped."""

    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    dropped: Callable[[str], None] = lambda reason: None


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with per-phase deadlines and a lingering close."""

    deadlines: Deadlines  # set by protocol_class()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = ""
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._request_done = True  # the parser has the current request's whole body
        self._body_seen = False  # a byte of the current request's body has arrived
        self._close_after = False  # the current request asked to close the connection
        self._drained = 0

    # -- deadlines -----------------------------------------------------------------------
    #
    # Setting a deadline only writes two attributes: one timer per connection checks it
    # and moves itself on. A timer per phase (three or four per request) took the
    # gateway from ~150 to ~185 us of CPU per request; this way it stays within noise.

    def _arm(self, phase: str, seconds: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + seconds
        if self._deadline < self._timer_at:
            self._schedule(self._deadline)

    def _disarm(self) -> None:
        """No deadline: the app has a whole request and answers within its own bound."""
        self._phase = ""
        self._deadline = math.inf

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._check)
        self._timer_at = when

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._disarm()

    def _check(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if now < self._deadline:
            # Not due (a later phase moved it on), or none now: look again then, or after
            # the shortest deadline (a connection's timer never stops while it is open).
            d = self.deadlines
            tick = min(d.header_timeout_s, d.body_timeout_s, d.keep_alive_s)
            self._schedule(min(self._deadline, now + tick))
        elif self._phase == "headers":
            self._drop("header_timeout")
        elif self._phase == "body":
            self._drop("body_timeout")
        elif self._phase == "drain":
            self._drop("drain_limit")
        else:  # idle: an ordinary end of a kept-alive connection
            self._close()

    def _drop(self, reason: str) -> None:
        if not self.transport.is_closing():
            log.debug("closing a connection from %s: %s", self.client, reason)
            self.deadlines.dropped(reason)
        self._close()

    def _close(self) -> None:
        self._stop_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # -- uvicorn's protocol, extended ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.deadlines.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_done = False
        self._body_seen = False
        if self._phase == "idle":
            self._arm("headers", self.deadlines.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            self._close_after = not cycle.keep_alive
            cycle.keep_alive = True
        self._arm("body", self.deadlines.body_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if (
            not self._request_done
            and cycle is not None
            and cycle.body
            and not cycle.response_complete
        ):
            # Part of a body is waiting for the app: read more only once the app asks
            # for it (its receive() resumes reading); uvicorn would read 64 KiB ahead.
            self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        if self.cycle is not None and self.cycle.response_complete:
            # Answered already: discard the rest, within the drain bound.
            self._drained += len(body)
            if self._drained > DRAIN_MAX_BYTES:
                self._drop("drain_limit")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._request_done = True
        if self._phase == "drain":
            self._after_request()
        elif self._phase == "body":
            self._disarm()  # the app has the request; it answers within its own bound

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:
            # Closed already, or uvicorn started a pipelined request: its answer decides.
            return
        if self._request_done:
            self._after_request()
        elif self.expect_100_continue and not self._body_seen:
            # Answered before "100 Continue": the client sends no body, so there is
            # nothing to discard, and the rest of the request will never come.
            self._close()
        else:
            self._drained = 0
            self.cycle.body = bytearray()  # what was read ahead is discarded too
            self._arm("drain", DRAIN_TIME_S)

    def _after_request(self) -> None:
        """The request's answer is sent and its body is over: close, or wait for the next."""
        if self._close_after:
            self._close()
        else:
            self._arm("idle", self.deadlines.keep_alive_s)


def protocol_class(deadlines: Deadlines) -> type[GatewayProtocol]:
    """A :class:`GatewayProtocol` with these deadlines, for ``uvicorn.Config(http=...)``."""
    return type("GatewayProtocol", (GatewayProtocol,), {"deadlines": deadlines})


def raise_open_files() -> int:
    """Raise this process's open-files soft limit to its hard limit; return the limit.

    Each connection is a file descriptor: with the common soft limit of 1,024, a crowd of
    idle connections would make the gateway refuse new ones before any deadline passes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft

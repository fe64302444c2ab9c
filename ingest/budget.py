"""A bound on the request bytes the gateway holds at once, across all requests.

A body is read whole before its signature can be checked, so without a bound a crowd of
large uploads (signed or not: the signature is only known at the end) holds as much
memory as they send. Each request takes its bytes from one shared :class:`ByteBudget`
as they arrive and gives them back when it is answered; a request that does not fit is
refused at once (503 with ``Retry-After``) instead of being buffered.

Bytes are counted as they arrive, not as declared: a client that declares a large body
and sends it slowly holds only what it sent. A request that declares more than is left
is still refused before a byte of its body is read.

All of it runs on the event loop, so no lock is needed.
"""

from __future__ import annotations

from types import TracebackType

__all__ = ["ByteBudget", "Lease"]


class ByteBudget:
    """``limit`` bytes shared by every request; :meth:`lease` one per request."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes could be taken now."""
        return self.used + size <= self.limit

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """One request's share of a :class:`ByteBudget`; a context manager that gives it back."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def take(self, size: int) -> bool:
        """Take ``size`` bytes, or return False (taking nothing) when they do not fit."""
        if not self._budget.fits(size):
            return False
        self._budget.used += size
        self.held += size
        return True

    def release(self) -> None:
        self._budget.used -= self.held
        self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

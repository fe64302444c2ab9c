"""The values the operator commands' options share: times and ages (:func:`parse_time`), and
the ``argparse`` types that read them.

Each turns a bad value into :class:`argparse.ArgumentTypeError`, so ``--help``-style usage
and exit code 2 come from argparse itself.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

__all__ = ["argument", "at_least_one", "parse_time", "positive", "time_arg"]

_T = TypeVar("_T")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """An RFC 3339 time, a date (UTC midnight), or an age before ``now`` (``90s``, ``2h``, ``7d``).

    A time without an offset is taken as UTC. Raise ``ValueError`` with the accepted forms.
    """
    age = _AGE.match(text)
    if age is not None:
        return now - timedelta(seconds=float(age.group(1)) * _UNITS[age.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-27T10:00:00Z), "
            "a date (2026-11-27) or an age (90s, 15m, 2h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def argument(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """``parse`` as an argparse type: its ``ValueError`` becomes the option's error."""

    def read(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = parse.__name__  # argparse names the type in "invalid ... value"
    return read


def _time(text: str) -> datetime:
    return parse_time(text, datetime.now(UTC))


time_arg = argument(_time)  # an age (90m, 2d) before now, or an RFC 3339 time


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def positive(what: str = "a number") -> Callable[[str], float]:
    """A parser of numbers above 0; its error says ``expected {what} above 0``."""

    def read(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected {what} above 0, not {text!r}")
        return value

    return read

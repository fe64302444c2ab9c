"""Ports for local services: free, and never from the range outgoing connections use."""

from __future__ import annotations

import socket

import pytest

from chargify_stream.local import ports


def test_a_port_is_free_and_below_the_ephemeral_range() -> None:
    start = ports._ephemeral_start()
    for _ in range(50):
        port = ports.free_port()
        assert ports.LOWEST <= port < start
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # nothing holds it


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        taken = next(p for p in range(20_000, 30_000) if _bound(held, p))
        held.listen()
        other = next(p for p in range(taken + 1, 30_000) if _can_bind(p))
        draws = iter([taken, other])
        monkeypatch.setattr(ports.random, "randint", lambda _low, _high: next(draws))
        assert ports.free_port() == other


def _bound(s: socket.socket, port: int) -> bool:
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return _bound(s, port)

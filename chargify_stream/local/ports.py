"""Free loopback ports, so that two runs on one machine cannot collide.

A port is drawn at random below the kernel's ephemeral range (Linux: 32768-60999,
``/proc/sys/net/ipv4/ip_local_port_range``), never from it: the kernel hands ports of that
range to every outgoing connection, so one picked there could be taken by a Kafka or
Postgres client between the pick and the listener's bind.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral
    range when there is room below it."""
    highest = _ephemeral_start() - 1
    if highest > LOWEST:
        for _ in range(200):
            port = random.randint(LOWEST, highest)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

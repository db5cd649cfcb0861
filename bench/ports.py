"""Ports for test and fault-run processes that are started, killed and started again on
the same port: a band below the kernel's ephemeral range for each, where no connection's
local port and no other band's process lands."""

from __future__ import annotations

import random
import socket


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for a connection's local port (Linux's default where unread)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


# Bands of ports from BAND_FLOOR up to the ephemeral range: one per test process (its xdist
# worker number % TEST_BANDS), then the fault run's (bench/chaos.py), which none of them use
BAND_FLOOR, TEST_BANDS, CHAOS_BAND = 12000, 4, 4
_handed_out: set[int] = set()


def band(number: int) -> range:
    """Band ``number``'s ports (of TEST_BANDS + 1 below the ephemeral range)."""
    width = (ephemeral_ports()[0] - BAND_FLOOR) // (TEST_BANDS + 1)
    return range(BAND_FLOOR + width * number, BAND_FLOOR + width * (number + 1))


def band_port(number: int) -> int:
    """A free port in band ``number``, not handed out before by this process. No connection
    takes one as its local port (the kernel's port 0 gives those from the ephemeral range,
    and any connection may take it between a kill and a restart), and no other process
    sharing the machine's bands picks one of another band."""
    ports = band(number)
    if len(ports) < 100:   # an ephemeral range starting too low for bands: the kernel's
        # (not free_port, which tests/conftest.py makes this)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if len(_handed_out) > len(ports) * 4 // 5:
        _handed_out.clear()
    while True:
        port = random.randrange(ports.start, ports.stop)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port

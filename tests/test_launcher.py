"""The launcher's port choice: ports the kernel never hands to an outgoing connection, none issued twice."""

from __future__ import annotations

import socket

from extproc.launcher import _ephemeral_range, free_port, free_port_pair


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    low, _high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_pair_is_not_issued_again() -> None:
    first = free_port_pair()
    later = {free_port() for _ in range(200)}
    assert first not in later and first + 1 not in later

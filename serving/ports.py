"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that were free a moment ago on ``host``: every socket stays bound until
    all are chosen, so the kernel cannot hand out one port twice. Another process may still take a
    port before its user binds it; callers that can retry on ``EADDRINUSE`` should."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = HOST) -> int:
    """One free port on ``host`` (default 127.0.0.1; ``""`` for every interface, as a rendezvous
    that other machines must reach needs)."""
    return free_ports(1, host)[0]

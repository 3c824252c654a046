"""Whether this process can reach a service (W&B, the Hugging Face hub) at all: decided in seconds.

Compute nodes often have no network. The services' own clients find that out slowly (W&B's
after ~2 minutes of retries, the hub's after ~40 s), so before relying on one we open a TCP
connection to it (or to the HTTPS proxy that would carry the traffic) with a short timeout.
"""

from __future__ import annotations

import functools
import socket
import threading
import urllib.request
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) that a request to `url` first connects to: its proxy's when one applies."""
    parsed = urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname or ""
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    return host, port


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to `url` (or its proxy) opens within `timeout` seconds; else
    why not, in a few words ("host:port: connection refused")."""
    return probe(*endpoint(url), timeout)


@functools.cache  # one answer per process: W&B's mode is decided twice, the hub's per build
def probe(host: str, port: int, timeout: float) -> str | None:
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(reason(error, timeout))

    # A thread: name resolution (getaddrinfo) takes no timeout of its own and can hang.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    why = outcome[0] if outcome else f"no answer within {timeout:g} s"
    return None if why is None else f"{host}:{port}: {why}"


def reason(error: OSError, timeout: float) -> str:
    if isinstance(error, socket.gaierror):
        return "name not resolved"
    if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError
        return f"no answer within {timeout:g} s"
    return (error.strerror or type(error).__name__).lower()

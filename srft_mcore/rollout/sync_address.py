"""The address of this node that servers on other nodes dial for the ``distributed`` weight
sync (``rollout.sync_address`` / ``SRFT_SYNC_ADDR``)."""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Optional, Sequence
from urllib.parse import urlparse


def _is_loopback(host: Optional[str]) -> bool:
    """``host`` names this machine's loopback interface (a literal address or localhost)."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_sync_address(value: Optional[str], urls: Sequence[str]) -> str:
    """The address of this node that the servers ``urls`` dial for the distributed weight
    sync (``rollout.sync_address``; see :mod:`srft_mcore.config`). The environment variable
    SRFT_SYNC_ADDR wins (one value per node); null means 127.0.0.1 when every server is on
    loopback, else ``auto``; ``auto`` is the address of the interface this node reaches the
    first remote server through (no packet is sent), else its host name's address."""
    env = os.environ.get("SRFT_SYNC_ADDR", "").strip()
    if env:
        return env
    hosts = [(urlparse(u).hostname, urlparse(u).port or 80) for u in urls]
    remote = [(h, p) for h, p in hosts if not _is_loopback(h)]
    if value is None:
        if not remote:
            return "127.0.0.1"
        value = "auto"
    if value != "auto":
        return value
    if not remote:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(remote[0])  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())

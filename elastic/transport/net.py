"""Which local address to use towards a peer (a rank's gloo sockets bind there, never on every interface)."""
from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_address_towards(host: str) -> str:
    """This machine's address on the interface that routes to `host` (the head's address on the head
    itself, loopback for loopback). A UDP connect only consults the routing table: nothing is sent."""
    if is_loopback(host):
        return host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]

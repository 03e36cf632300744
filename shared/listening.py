"""What this process really listens on, and which network device carries an address (Linux).

`listening_sockets()` reads /proc/net/tcp{,6} and keeps the listening sockets whose inodes are
open in this process: what the start-up logs print and the security tests check (the same data
`ss -ltnp` shows). `net_device_of(host)` names the interface whose IPv4 address is `host`, so a
transport that listens per device (UCX's tcp) can be held to that one. Standard library only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

_SIOCGIFADDR = 0x8915
_WILDCARDS = ("", "0.0.0.0", "::", "*")


def _decode_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc prints IPv6 as four little-endian 32-bit words
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        ip = ip.removeprefix("::ffff:") if ip.startswith("::ffff:") and "." in ip else ip  # IPv4-mapped
    return ip, int(port, 16)


def _socket_inodes(pid: int | str) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_sockets(pid: int | str = "self") -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket process `pid` listens on."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                found.add(_decode_address(fields[1]))
    return found


def is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def net_device_of(host: str) -> str | None:
    """The interface holding `host`'s IPv4 address; None for a wildcard host; raises ValueError
    if no interface of this machine has it (an address we could never bind)."""
    if is_wildcard(host):
        return None
    address = socket.gethostbyname(host)
    if ipaddress.ip_address(address).is_loopback:
        address = "127.0.0.1"  # UCX's tcp transport listens on lo's primary address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    raise ValueError(f"no network interface of this machine has the address {host} ({address})")

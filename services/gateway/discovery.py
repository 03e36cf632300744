"""Workers found through DNS: `dns:///NAME:PORT` (or `dns://DNS-SERVER:PORT/NAME:PORT`, gRPC's target syntax).

A worker address of that form is a set of workers, not one: every IP the name resolves to,
at PORT. On Kubernetes, NAME is a role's headless Service, whose answer is the IPs of that role's
ready pods. The gateway re-resolves each name every `discovery_interval_s`:

    new IP in the answer            -> an instance (and its gRPC client) is added; the load poller
                                       marks it healthy once its GetLoad answers
    IP gone from the answer         -> the instance is retired: no new requests go to it, the
                                       requests it has run to their end (a draining pod leaves DNS
                                       as soon as its readiness drops), then its client is closed
    name does not exist / no IPs    -> every instance of that name is retired (scaled to zero)
    resolver times out or fails     -> nothing changes (a DNS hiccup must not empty the fleet)

Without a DNS server in the address the system resolver answers (getaddrinfo: /etc/hosts,
resolv.conf search domains, as Kubernetes sets up); with one, that server is asked directly.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.resolver

from splitserve.services.gateway.router import Router

logger = logging.getLogger(__name__)

DNS_SCHEME = "dns:"


def is_dns_url(url: str) -> bool:
    return url.startswith(DNS_SCHEME)


class NameNotFound(Exception):
    """The name has no addresses (it does not exist, or has no A/AAAA records): zero workers."""


@dataclass(frozen=True)
class DnsTarget:
    url: str
    """As configured (`dns:///NAME:PORT`)."""
    role: str
    name: str
    port: int
    nameserver: tuple[str, int] | None = None
    """The DNS server to ask (from the address's authority); None: the system resolver."""

    @classmethod
    def parse(cls, url: str, role: str) -> DnsTarget:
        rest = url.removeprefix(DNS_SCHEME)
        if not rest.startswith("//"):
            raise ValueError(f"{url!r}: a DNS worker address is dns:///NAME:PORT or dns://SERVER:PORT/NAME:PORT")
        authority, _, endpoint = rest[2:].partition("/")
        name, port = _host_port(endpoint, url)
        return cls(url, role, name, port, _host_port(authority, url) if authority else None)

    def address(self, ip: str) -> str:
        return f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: {text!r} is not HOST:PORT (the port is required)")
    return host.strip("[]"), int(port)


async def resolve(target: DnsTarget, timeout_s: float) -> set[str]:
    """The worker addresses (`ip:port`) the target's name resolves to now; raises NameNotFound
    when it has none, anything else when the lookup itself failed."""
    ips = await (_ask_server(target, timeout_s) if target.nameserver else _ask_system(target, timeout_s))
    if not ips:
        raise NameNotFound(target.name)
    return {target.address(ip) for ip in ips}


async def _ask_system(target: DnsTarget, timeout_s: float) -> set[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(target.name, target.port, type=socket.SOCK_STREAM), timeout_s)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NameNotFound(target.name) from None
        raise
    return {info[4][0] for info in infos}


async def _ask_server(target: DnsTarget, timeout_s: float) -> set[str]:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [target.nameserver[0]], target.nameserver[1]
    ips: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(target.name, rdtype, lifetime=timeout_s, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NameNotFound(target.name) from None
        ips |= {record.address for record in answer}
    return ips


class Discovery:
    """Keeps the router's instances, and the gateway's clients of them, in step with DNS."""

    def __init__(self, router: Router, clients: dict, make_client: Callable, targets: list[DnsTarget],
                 timeout_s: float) -> None:
        self.router, self.clients, self.make_client = router, clients, make_client
        self.targets, self.timeout_s = targets, timeout_s

    async def run(self, interval_s: float) -> None:
        """Forever: refresh, then sleep `interval_s`. Cancel to stop."""
        while True:
            await self.refresh_once()
            await asyncio.sleep(interval_s)

    async def refresh_once(self) -> None:
        answers = await asyncio.gather(*(resolve(t, self.timeout_s) for t in self.targets), return_exceptions=True)
        for target, answer in zip(self.targets, answers):
            self._apply(target, answer)
        await self._close_finished()

    def _apply(self, target: DnsTarget, answer: set[str] | BaseException) -> None:
        if isinstance(answer, NameNotFound):
            answer = set()
        elif isinstance(answer, BaseException):
            logger.warning("resolving %s failed (%s: %s); keeping its %d workers", target.url,
                           type(answer).__name__, answer, len(self.router.from_source(target.url)))
            return
        current = {i.url for i in self.router.from_source(target.url)}
        for url in sorted(answer - current):
            if self.router.add(url, target.role, source=target.url) is not None:
                self.clients[url] = self.make_client(url)
        for url in sorted(current - answer):
            self.router.retire(url)

    async def _close_finished(self) -> None:
        """Drop retired instances that have nothing in flight any more (and close their clients)."""
        for instance in self.router.idle_retired():
            self.router.remove(instance)
            client = self.clients.pop(instance.url, None)
            if client is not None:
                await client.close()

"""DNS discovery of workers (services/gateway/discovery.py) against a real DNS server.

The server is dnslib's, started by the test on a loopback UDP port, answering from a table the
test edits (as Kubernetes edits a headless Service's records when pods come and go). Workers are
scripted gRPC servers on 127.0.0.2, .3, ... (all loopback on Linux) at one port, as pods of one
Deployment are. The gateway is real (uvicorn, HTTP), pointed at the server with gRPC's target
syntax `dns://127.0.0.1:PORT/NAME:PORT`.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

from checkpoints import demo_tokenizer
from scripted_worker import BackgroundLoop, GatewayServer, Script, start_scripted_worker, stop_scripted_worker, wait_until
from splitserve.services.gateway.app import build_app
from splitserve.services.gateway.config import GatewayConfig, GatewayConfigError
from splitserve.services.gateway.discovery import DnsTarget, NameNotFound, resolve

MODEL = "splitserve-demo"
NAME = "workers.splitserve.test"


class TableResolver(BaseResolver):
    """Answers A queries from `records` (name -> IPs); unknown names get NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        with self.lock:
            ips = self.records.get(name)
        if ips is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
        return reply

    def set(self, name: str, ips: list[str] | None) -> None:
        with self.lock:
            if ips is None:
                self.records.pop(name, None)
            else:
                self.records[name] = list(ips)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dns_server():
    resolver = TableResolver()
    port = _free_udp_port()
    server = DNSServer(resolver, port=port, address="127.0.0.1", tcp=False, logger=_QuietLogger())
    server.start_thread()
    yield resolver, port
    server.stop()


class _QuietLogger:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def loop():
    bg = BackgroundLoop()
    yield bg
    bg.close()


# ----------------------------------------------------------------------------- addresses and lookups


def test_dns_addresses_parse_and_malformed_ones_are_refused():
    target = DnsTarget.parse("dns:///prefill-headless:50051", "prefill")
    assert (target.name, target.port, target.nameserver) == ("prefill-headless", 50051, None)
    target = DnsTarget.parse("dns://10.0.0.10:53/p.ns.svc.cluster.local:50051", "prefill")
    assert (target.name, target.port, target.nameserver) == ("p.ns.svc.cluster.local", 50051, ("10.0.0.10", 53))
    for bad in ("dns:prefill:50051", "dns:///prefill", "dns:///prefill:http", "dns://ns/prefill:1"):
        with pytest.raises(GatewayConfigError, match="dns"):
            GatewayConfig(model_dir="/m", served_model_name=MODEL, worker_urls=(bad,)).validate()


def test_resolve_asks_the_named_server(dns_server):
    table, port = dns_server
    table.set("two.test", ["127.0.0.2", "127.0.0.3"])
    target = DnsTarget.parse(f"dns://127.0.0.1:{port}/two.test:7000", "decode")
    assert asyncio.run(resolve(target, 5.0)) == {"127.0.0.2:7000", "127.0.0.3:7000"}
    with pytest.raises(NameNotFound):
        asyncio.run(resolve(DnsTarget.parse(f"dns://127.0.0.1:{port}/missing.test:7000", "decode"), 5.0))


def test_resolve_with_the_system_resolver():
    # /etc/hosts answers localhost: the path a pod takes (getaddrinfo) without a server in the address.
    addresses = asyncio.run(resolve(DnsTarget.parse("dns:///localhost:7000", "decode"), 5.0))
    assert "127.0.0.1:7000" in addresses


def test_a_server_that_does_not_answer_is_a_failure_not_an_empty_fleet():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        target = DnsTarget.parse(f"dns://127.0.0.1:{silent.getsockname()[1]}/x.test:1", "decode")
        with pytest.raises(Exception) as err:
            asyncio.run(resolve(target, 0.5))
        assert not isinstance(err.value, NameNotFound)
    finally:
        silent.close()


# ----------------------------------------------------------------------------- the gateway


def _workers_on_health(http: httpx.Client) -> list[dict]:
    return http.get("/health").json()["workers"]


def _complete(http: httpx.Client, **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra})


@pytest.mark.slow
def test_gateway_adds_and_drops_workers_as_dns_changes(dns_server, loop):
    table, dns_port = dns_server
    port = _free_tcp_port()
    table.set(NAME, ["127.0.0.2"])
    workers = {}
    for ip in ("127.0.0.2", "127.0.0.3"):
        workers[ip], _ = loop.call(lambda ip=ip: start_scripted_worker(
            "colocated", Script(tokens=list(range(10, 20)), delay_s=0.05), f"w{ip}", port=port, host=ip))
    cfg = GatewayConfig(model_dir="/nonexistent", served_model_name=MODEL,
                        worker_urls=(f"dns://127.0.0.1:{dns_port}/{NAME}:{port}",),
                        load_poll_interval_s=0.1, load_rpc_timeout_s=0.5, discovery_interval_s=0.1)
    gateway = GatewayServer(loop, build_app(cfg, tokenizer=demo_tokenizer()))
    http = httpx.Client(base_url=gateway.url, timeout=30)
    try:
        wait_until(lambda: http.get("/health").status_code == 200, 30, "the first worker to be found")
        assert _complete(http).status_code == 200
        assert len(workers["127.0.0.2"].record.generates) == 1

        # A new pod: found at the next lookup, and it takes work.
        table.set(NAME, ["127.0.0.2", "127.0.0.3"])
        wait_until(lambda: sum(w["healthy"] for w in _workers_on_health(http)) == 2, 30, "the second worker")
        for _ in range(6):
            assert _complete(http).status_code == 200
        assert workers["127.0.0.3"].record.generates, "the new worker got no request"

        # A pod leaves (its readiness dropped) with a stream in flight: the stream finishes; new
        # requests go to the other one; once idle, the instance is gone from the gateway.
        with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 10,
                                                         "stream": True}) as inflight:
            lines = inflight.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            on_2 = {g.request_id for g in workers["127.0.0.2"].record.generates}
            leaving = "127.0.0.2" if len(on_2) > len(workers["127.0.0.2"].record.completed) else "127.0.0.3"
            staying = "127.0.0.3" if leaving == "127.0.0.2" else "127.0.0.2"
            assert len(workers[leaving].record.generates) > len(workers[leaving].record.completed)
            table.set(NAME, [staying])
            wait_until(lambda: sum(w["healthy"] for w in _workers_on_health(http)) == 1, 30, "the retirement")
            before = len(workers[leaving].record.generates)
            for _ in range(4):
                assert _complete(http).status_code == 200
            assert len(workers[leaving].record.generates) == before, "a retired worker got a new request"
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert not workers[leaving].record.cancelled
        wait_until(lambda: len(_workers_on_health(http)) == 1, 30, "the retired worker to be removed")

        # Every pod gone (NXDOMAIN): nothing to route to, and the gateway says so; it is still alive.
        table.set(NAME, None)
        wait_until(lambda: http.get("/health").status_code == 503, 30, "the gateway to see no worker")
        assert _complete(http).status_code == 503
        assert http.get("/livez").status_code == 200
    finally:
        http.close()
        gateway.stop()
        for worker in workers.values():
            loop.call(lambda w=worker: stop_scripted_worker(w))


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

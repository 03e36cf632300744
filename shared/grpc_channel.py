"""The one place that builds gRPC channels and servers.

Every gRPC client and server in splitserve gets the same options from here: message-size limits
raised above gRPC's 4 MiB default (a 100k-token prompt is ~500 kB of varints, fine either way,
but long prompts with logprobs should never hit a limit), HTTP/2 keepalive so a dead peer is
noticed in seconds rather than at the next TCP timeout, and short reconnect backoff so a worker
that comes back is usable at once. Interceptors (OpenTelemetry's, which carry W3C `traceparent`
in metadata) are passed in by the caller; this module imports no telemetry. Authentication (a
bearer token, mutual TLS: shared/grpc_security.py) is applied here, to every channel and server.

Torch-free: the gateway uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from splitserve.shared.grpc_security import GrpcSecurity, SyncTokenInterceptor, TokenCheck, aio_token_interceptors

_OPEN = GrpcSecurity()

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 10_000
"""Client pings an idle connection this often."""
KEEPALIVE_TIMEOUT_MS = 5_000
"""A ping unanswered this long closes the connection (the peer is gone)."""
_SCHEMES = ("grpc://", "http://", "dns:///")


def normalize_address(url: str) -> str:
    """`grpc://host:port`, `http://host:port` or `host:port` -> `host:port` (what gRPC dials)."""
    address = url.strip()
    for scheme in _SCHEMES:
        if address.startswith(scheme):
            address = address[len(scheme):]
    address = address.rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"gRPC address must look like host:port (optionally grpc://host:port), got {url!r}")
    return address


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Accept the clients' keepalive pings (a stricter server answers them with GOAWAY).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_pings_without_data", 0),
        # Two servers on one port would split traffic silently; make the second bind fail instead.
        ("grpc.so_reuseport", 0),
    ]


def aio_channel(
    url: str,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: GrpcSecurity = _OPEN,
) -> grpc.aio.Channel:
    """An asyncio channel to `url` (must be created inside the event loop that uses it)."""
    chain = [*interceptors, *(aio_token_interceptors(security.metadata()) if security.token else [])]
    options = channel_options(max_message_bytes)
    if security.tls:
        return grpc.aio.secure_channel(normalize_address(url), security.channel_credentials(), options=options,
                                       interceptors=chain or None)
    return grpc.aio.insecure_channel(normalize_address(url), options=options, interceptors=chain or None)


def sync_channel(
    url: str,
    *,
    interceptors: Sequence[Any] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: GrpcSecurity = _OPEN,
) -> grpc.Channel:
    """A blocking channel (launchers, health probes, scripts); interceptors as for `grpc.intercept_channel`."""
    options = channel_options(max_message_bytes)
    channel = (grpc.secure_channel(normalize_address(url), security.channel_credentials(), options=options)
               if security.tls else grpc.insecure_channel(normalize_address(url), options=options))
    chain = [*interceptors, *([SyncTokenInterceptor(security.metadata())] if security.token else [])]
    return grpc.intercept_channel(channel, *chain) if chain else channel


def aio_server(
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: GrpcSecurity = _OPEN,
) -> grpc.aio.Server:
    """An asyncio server with splitserve's options; the caller adds servicers and ports (add_port,
    with the same `security`). With a token, every call but Health must carry it."""
    chain = [*([TokenCheck(security.token)] if security.token else []), *interceptors]
    return grpc.aio.server(interceptors=chain or None, options=server_options(max_message_bytes))


def add_port(server: grpc.aio.Server, address: str, security: GrpcSecurity = _OPEN) -> int:
    """Bind `address` (`host:port`, port 0 picks a free one); return the bound port or raise OSError."""
    address = normalize_address(address)
    port = (server.add_secure_port(address, security.server_credentials()) if security.tls
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address} (address in use?)")
    return port

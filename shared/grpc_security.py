"""Authentication of the gRPC plane (gateway <-> workers): a bearer token, mutual TLS, or both.

    token   derived from the stack's shared secret (shared/auth.py); the gateway's channels send it
            as `authorization: Bearer <token>` on every call, and a worker's interceptor answers
            UNAUTHENTICATED to any call without it. Health stays open: probes (the launcher,
            Kubernetes, docker) need no credentials, and it reveals nothing but readiness.
    mTLS    --grpc-tls-ca/--grpc-tls-cert/--grpc-tls-key: servers present their certificate and
            require one signed by the CA from every client; clients verify the server's against
            the same CA. Without TLS the token crosses the network in clear: use TLS across hosts.

`GrpcSecurity` is built once per process from its flags and handed to shared/grpc_channel.py,
which applies it to every channel and server. Torch-free: the gateway uses it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc

from splitserve.shared.auth import grpc_token, secret_from_args

# grpc.health.v1 is what Kubernetes' native gRPC probes call (services/worker/health.py); they
# cannot send a token.
OPEN_METHODS = frozenset({"/splitserve.v1.Worker/Health", "/grpc.health.v1.Health/Check",
                          "/grpc.health.v1.Health/Watch"})
_HEADER = "authorization"


@dataclass(frozen=True)
class GrpcSecurity:
    token: str | None = None
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((_HEADER, f"Bearer {self.token}"),) if self.token else ()


def add_grpc_security_args(parser) -> None:
    group = parser.add_argument_group("internal plane security")
    group.add_argument("--secret-file", default=None,
                       help="file (mode 600) holding the stack's shared secret; authenticates gRPC and the "
                            "KV control plane (default: $SPLITSERVE_SECRET_FILE; `up` makes one)")
    group.add_argument("--grpc-tls-ca", default=None, help="CA certificate (PEM): mutual TLS on every gRPC channel")
    group.add_argument("--grpc-tls-cert", default=None, help="this process's certificate (PEM), signed by the CA")
    group.add_argument("--grpc-tls-key", default=None, help="this process's private key (PEM)")


def grpc_security_from_args(args) -> GrpcSecurity:
    paths = [getattr(args, f"grpc_tls_{name}", None) for name in ("ca", "cert", "key")]
    if any(paths) and not all(paths):
        raise SystemExit("--grpc-tls-ca, --grpc-tls-cert and --grpc-tls-key go together")
    ca, cert, key = (_read(p) for p in paths) if all(paths) else (None, None, None)
    return GrpcSecurity(grpc_token(secret_from_args(args)), ca, cert, key)


def grpc_security_argv(args) -> list[str]:
    """The flags that hand `args`' security settings to a child process (paths, never secrets)."""
    argv = []
    for name in ("secret_file", "grpc_tls_ca", "grpc_tls_cert", "grpc_tls_key"):
        if getattr(args, name, None):
            argv += ["--" + name.replace("_", "-"), getattr(args, name)]
    return argv


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class TokenCheck(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to every call but Health that lacks the bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        given = dict(details.invocation_metadata or ()).get(_HEADER, "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _refusal(handler)


async def _refuse(request_or_iterator, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong credentials for this worker")


async def _refuse_stream(request_or_iterator, context):
    await _refuse(request_or_iterator, context)
    yield  # pragma: no cover - abort raises


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_refuse, **kwargs)


class _TokenMetadata:
    """Adds the bearer token to every call's metadata (unary and streaming alike)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_token(self, details):
        metadata = [*(details.metadata or ()), *self._metadata]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)


class _Details:
    def __init__(self, details, metadata) -> None:
        self.method, self.timeout, self.metadata = details.method, details.timeout, metadata
        self.credentials, self.wait_for_ready = details.credentials, details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _AioUnaryUnary(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _AioUnaryStream(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _AioStreamUnary(_TokenMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


class _AioStreamStream(_TokenMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


def aio_token_interceptors(metadata: tuple[tuple[str, str], ...]) -> list:
    """One per call kind: grpc.aio files an interceptor under the first kind it implements only."""
    return [kind(metadata) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class SyncTokenInterceptor(_TokenMetadata, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

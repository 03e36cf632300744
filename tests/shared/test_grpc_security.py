"""gRPC plane authentication with real servers and channels: without the token every RPC but
Health is refused (unary, server-streaming and bidirectional alike); with mutual TLS a client
without a certificate from the CA cannot even connect. Certificates are made here with
`cryptography`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest

from splitserve.shared.grpc_channel import add_port, aio_channel, aio_server
from splitserve.shared.grpc_security import GrpcSecurity
from splitserve.shared.protocol import worker_pb2 as pb
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)


class Echo(pb_grpc.WorkerServicer):
    async def Health(self, request, context):
        return pb.HealthResponse(ready=True, instance_id="echo", message="ok")

    async def GetLoad(self, request, context):
        return pb.LoadReport(instance_id="echo")

    async def Abort(self, request, context):
        return pb.AbortResponse(found=True)

    async def Generate(self, request, context):
        yield pb.GenerateChunk(request_id=request.request_id, token_ids=[1])

    async def Session(self, request_iterator, context):
        async for command in request_iterator:
            yield pb.SessionOutput(chunks=[pb.GenerateChunk(request_id=command.generate.request_id)])
            return


async def _calls(stub) -> dict:
    """Each RPC kind once; the status code of each (OK or the failure)."""
    async def session():
        async def commands():
            yield pb.SessionCommand(generate=pb.GenerateRequest(request_id="s"))
        return [m async for m in stub.Session(commands(), timeout=10)]

    calls = {"Health": lambda: stub.Health(pb.HealthRequest(), timeout=10),
             "GetLoad": lambda: stub.GetLoad(pb.LoadRequest(), timeout=10),
             "Abort": lambda: stub.Abort(pb.AbortRequest(request_id="anyone's"), timeout=10),
             "Generate": lambda: _collect(stub.Generate(pb.GenerateRequest(request_id="g"), timeout=10)),
             "Session": session}
    codes = {}
    for name, call in calls.items():
        try:
            await call()
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes[name] = exc.code()
    return codes


async def _collect(call):
    return [m async for m in call]


async def _serve_and_call(server_security: GrpcSecurity, client_security: GrpcSecurity) -> dict:
    server = aio_server(security=server_security)
    pb_grpc.add_WorkerServicer_to_server(Echo(), server)
    port = add_port(server, "127.0.0.1:0", server_security)
    await server.start()
    try:
        async with aio_channel(f"127.0.0.1:{port}", security=client_security) as channel:
            return await _calls(pb_grpc.WorkerStub(channel))
    finally:
        await server.stop(None)


def _run(server_security, client_security) -> dict:
    return asyncio.run(_serve_and_call(server_security, client_security))


def test_without_the_token_every_rpc_but_health_is_refused():
    server = GrpcSecurity(token="t" * 64)
    codes = _run(server, GrpcSecurity())
    assert codes.pop("Health") == grpc.StatusCode.OK
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    wrong = _run(server, GrpcSecurity(token="u" * 64))
    assert wrong["Abort"] == wrong["Session"] == grpc.StatusCode.UNAUTHENTICATED
    assert set(_run(server, GrpcSecurity(token="t" * 64)).values()) == {grpc.StatusCode.OK}


def test_the_standard_health_service_answers_probes_without_the_token():
    """Kubernetes' gRPC probes (grpc.health.v1, services/worker/health.py) send no credentials."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitserve.services.worker.health import WorkerHealth

    async def probe():
        security = GrpcSecurity(token="t" * 64)
        server = aio_server(security=security)
        pb_grpc.add_WorkerServicer_to_server(Echo(), server)
        health = WorkerHealth(server)
        port = add_port(server, "127.0.0.1:0", security)
        await server.start()
        await health.serving()
        try:
            async with aio_channel(f"127.0.0.1:{port}", security=GrpcSecurity()) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
                return reply.status, (await _calls(pb_grpc.WorkerStub(channel)))["GetLoad"]
        finally:
            await server.stop(None)

    status, get_load = asyncio.run(probe())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert get_load == grpc.StatusCode.UNAUTHENTICATED


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_key=None, issuer_name=None, ca=False) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pki(tag: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca_key = _key()
    ca = _cert(f"{tag} CA", ca_key, ca=True)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{tag} CA")])

    def issue(subject):
        key = _key()
        return _cert(subject, key, ca_key, ca_name), _pem(key)
    return ca, issue


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca():
    ca, issue = _pki("stack")
    server_cert, server_key = issue("worker")
    client_cert, client_key = issue("gateway")
    server = GrpcSecurity(token="t" * 64, tls_ca=ca, tls_cert=server_cert, tls_key=server_key)
    client = GrpcSecurity(token="t" * 64, tls_ca=ca, tls_cert=client_cert, tls_key=client_key)
    assert set(_run(server, client).values()) == {grpc.StatusCode.OK}
    other_ca, other_issue = _pki("outsider")
    outsider_cert, outsider_key = other_issue("gateway")
    outsider = GrpcSecurity(token="t" * 64, tls_ca=ca, tls_cert=outsider_cert, tls_key=outsider_key)
    assert grpc.StatusCode.OK not in _run(server, outsider).values()
    assert set(_run(server, GrpcSecurity(token="t" * 64)).values()) == {grpc.StatusCode.UNAVAILABLE}  # plaintext

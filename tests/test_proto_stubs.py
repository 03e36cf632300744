"""The committed gRPC stubs match what `generate.py` produces from the .proto files (not stale)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from splitserve.shared.protocol import generate, worker_pb2, worker_pb2_grpc


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"}
    for fresh in written:
        committed = generate.PACKAGE_DIR / fresh.name
        assert committed.is_file(), f"{committed} is missing: run python -m splitserve.shared.protocol.generate"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run python -m splitserve.shared.protocol.generate")


def test_generated_imports_are_package_relative(tmp_path: Path) -> None:
    grpc_source = (generate.PACKAGE_DIR / "worker_pb2_grpc.py").read_text()
    assert "from splitserve.v1" not in grpc_source
    assert "from . import worker_pb2" in grpc_source


def test_stubs_expose_the_worker_service() -> None:
    service = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in service.methods} == {"Prefill", "Generate", "Session", "Abort", "GetLoad", "Health"}
    assert service.methods_by_name["Generate"].server_streaming
    session = service.methods_by_name["Session"]
    assert session.client_streaming and session.server_streaming
    assert hasattr(worker_pb2_grpc, "WorkerStub") and hasattr(worker_pb2_grpc, "WorkerServicer")


def test_optional_fields_keep_presence() -> None:
    params = worker_pb2.SamplingParams(temperature=0.0)
    assert not params.HasField("seed") and not params.HasField("max_tokens")
    params.seed = 0
    assert params.HasField("seed")
    assert worker_pb2.SamplingParams.FromString(params.SerializeToString()).HasField("seed")


def test_generate_rejects_a_broken_proto(tmp_path: Path) -> None:
    proto_dir = tmp_path / "proto" / "splitserve" / "v1"
    proto_dir.mkdir(parents=True)
    (proto_dir / "bad.proto").write_text('syntax = "proto3"; message { }')
    with pytest.raises(generate.ProtocError):
        generate.generate(tmp_path / "out", proto_root=tmp_path / "proto")


# ---- convert.py: the one proto <-> dataclass boundary ------------------------------------------

import grpc
from types import SimpleNamespace

import typing

from splitserve.shared.protocol import convert
from splitserve.shared.sampling_params import FIELD_TYPES, SamplingParams, sampling_fields


def test_sampling_params_round_trip_keeps_every_worker_field() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=0, presence_penalty=0.5,
                            frequency_penalty=-0.3, repetition_penalty=1.1, max_tokens=7, min_tokens=2,
                            stop=["x"], stop_token_ids=[3, 4], ignore_eos=True, logprobs=0,
                            logit_bias={7: -100.0, 9: 2.5})
    back = convert.sampling_params_from_proto(convert.sampling_params_to_proto(params))
    for name, _ in sampling_fields(wire=True):
        assert getattr(back, name) == getattr(params, name), name
    assert back.stop == [] and back.n == 1  # the gateway handles these


def test_the_proto_carries_exactly_the_wire_fields() -> None:
    assert {name for name, _ in sampling_fields(wire=True)} == set(worker_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


def _integer_edges(name: str, spec) -> tuple[int, int] | None:
    """The declared range of an integer field (of its items or keys for a list or dict)."""
    kind = FIELD_TYPES[name]
    if typing.get_origin(kind) in (list, dict):
        return spec.item_ge, spec.item_le
    return (spec.ge, spec.le) if int in (kind, *typing.get_args(kind)) else None


@pytest.mark.parametrize("end", [0, 1])
def test_every_integer_range_fits_its_proto_type(end: int) -> None:
    """Each integer field at either edge of its declared range survives the proto: no overflow."""
    for name, spec in sampling_fields(wire=True):
        edges = _integer_edges(name, spec)
        if edges is None:
            continue
        edge = edges[end]
        value = {list: [edge], dict: {edge: 1.0}}.get(typing.get_origin(FIELD_TYPES[name]), edge)
        extra = {"max_tokens": None} if name == "min_tokens" else {}
        params = SamplingParams(**{name: value, **extra})
        back = convert.sampling_params_from_proto(convert.sampling_params_to_proto(params))
        assert getattr(back, name) == getattr(params, name), name


def test_sampling_params_absent_optionals_stay_none() -> None:
    back = convert.sampling_params_from_proto(convert.sampling_params_to_proto(SamplingParams(max_tokens=None)))
    assert back.seed is None and back.max_tokens is None and back.logprobs is None


def test_engine_output_becomes_chunk_and_back() -> None:
    out = SimpleNamespace(request_id="r", new_token_ids=[5, 6], new_logprobs=[-0.5, -1.5], new_ranks=[1, 2],
                          new_top_logprobs=[[(5, -0.5)], [(7, -1.0)]], finished=True, finish_reason="stop",
                          stop_reason=6, num_prompt_tokens=9, num_cached_tokens=4, kv_bytes_received=1024,
                          num_recomputed_tokens=0, kv_handle=None)
    chunk = convert.chunk_from_proto(convert.engine_output_to_chunk(out))
    assert chunk.token_ids == [5, 6] and chunk.logprobs == [-0.5, -1.5]
    assert chunk.top_logprobs == [[(5, -0.5)], [(7, -1.0)]]
    assert (chunk.finish_reason, chunk.stop_token_id, chunk.kv_bytes_received) == ("stop", 6, 1024)


def test_prompt_logprobs_cross_chunks_and_prefill_responses() -> None:
    scored = [SimpleNamespace(token_id=8, logprob=-2.5, rank=3, top_logprobs=[(1, -0.1), (4, -0.7)])]
    out = SimpleNamespace(request_id="r", new_token_ids=[5], new_logprobs=[-0.5], new_ranks=[1],
                          new_top_logprobs=[[]], new_prompt_logprobs=scored, finished=True, finish_reason="length",
                          stop_reason=None, num_prompt_tokens=2, num_cached_tokens=0, kv_bytes_received=0,
                          num_recomputed_tokens=0, kv_handle=None)
    expected = [(8, -2.5, 3, [(1, -0.1), (4, -0.7)])]
    assert convert.chunk_from_proto(convert.engine_output_to_chunk(out)).prompt_logprobs == expected
    assert convert.chunk_from_prefill_response(convert.engine_output_to_prefill_response(out)).prompt_logprobs == expected
    params = convert.sampling_params_from_proto(convert.sampling_params_to_proto(
        SamplingParams(temperature=0.0, prompt_logprobs=3)))
    assert params.prompt_logprobs == 3


def test_prefill_output_without_handle_must_be_finished() -> None:
    out = SimpleNamespace(request_id="r", new_token_ids=[5], new_logprobs=[-0.5], new_ranks=[1],
                          new_top_logprobs=[[]], finished=False, finish_reason=None, stop_reason=None,
                          num_prompt_tokens=3, num_cached_tokens=0, kv_handle=None)
    with pytest.raises(ValueError, match="neither finished nor"):
        convert.engine_output_to_prefill_response(out)
    out.finished, out.finish_reason = True, "length"
    first = convert.chunk_from_prefill_response(convert.engine_output_to_prefill_response(out))
    assert first.token_ids == [5] and first.finish_reason == "length" and first.num_prompt_tokens == 3


def test_kv_handle_round_trip() -> None:
    handle_mod = pytest.importorskip("splitserve.shared.transfer.handle")
    import dataclasses

    names = {f.name for f in dataclasses.fields(handle_mod.KvHandle)}
    assert set(convert._KV_HANDLE_FIELDS) <= names, "KvHandle fields and the proto diverged"
    msg = convert.kv_handle_to_proto(convert.kv_handle_from_proto(convert.pb.KvHandle(
        version=1, instance_id="p0", request_id="r", block_ids=[3, 1], num_tokens=20, layout_hash="ab",
        control_address="tcp://127.0.0.1:5555")))
    assert list(msg.block_ids) == [3, 1] and msg.layout_hash == "ab" and msg.instance_id == "p0"
    handle = convert.kv_handle_from_proto(msg)
    assert handle.block_ids == (3, 1) and handle.num_tokens == 20
    with pytest.raises(handle_mod.KvHandleError, match="num_tokens"):
        convert.kv_handle_from_proto(convert.pb.KvHandle(num_tokens=-1))


def test_load_report_round_trip_and_bad_role() -> None:
    load = convert.WorkerLoad("d0", "decode", "m", 2048, 16, num_waiting_tokens=99, num_free_blocks=7,
                              counters={"num_preemptions": 2})
    assert convert.load_from_proto(convert.load_to_proto(load)) == load
    with pytest.raises(ValueError, match="role"):
        convert.load_to_proto(convert.WorkerLoad("x", "router", "m", 1, 16))


# ---- grpc_channel.py ---------------------------------------------------------------------------

import asyncio

from splitserve.shared import grpc_channel


def test_addresses_are_normalized_and_bad_ones_rejected() -> None:
    assert grpc_channel.normalize_address("grpc://localhost:50051/") == "localhost:50051"
    assert grpc_channel.normalize_address(" 10.0.0.2:7 ") == "10.0.0.2:7"
    for bad in ("localhost", "http://host:", ":80", "host:port"):
        with pytest.raises(ValueError, match="host:port"):
            grpc_channel.normalize_address(bad)


def test_a_second_server_on_a_bound_port_fails_to_bind() -> None:
    async def scenario() -> None:
        first, second = grpc_channel.aio_server(), grpc_channel.aio_server()
        port = grpc_channel.add_port(first, "127.0.0.1:0")
        await first.start()
        try:
            with pytest.raises((OSError, RuntimeError)):
                grpc_channel.add_port(second, f"127.0.0.1:{port}")
        finally:
            await first.stop(None)

    asyncio.run(scenario())


def test_channel_round_trip_with_an_interceptor() -> None:
    seen = []

    class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            seen.append(details.method)
            return await continuation(details, request)

    class Health(worker_pb2_grpc.WorkerServicer):
        async def Health(self, request, context):
            return worker_pb2.HealthResponse(ready=True, instance_id="w")

    async def scenario() -> None:
        server = grpc_channel.aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(Health(), server)
        port = grpc_channel.add_port(server, "127.0.0.1:0")
        await server.start()
        try:
            async with grpc_channel.aio_channel(f"grpc://127.0.0.1:{port}", interceptors=[Recorder()]) as channel:
                resp = await worker_pb2_grpc.WorkerStub(channel).Health(worker_pb2.HealthRequest(), timeout=5)
            assert resp.ready and resp.instance_id == "w"
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    assert [m.decode() if isinstance(m, bytes) else m for m in seen] == ["/splitserve.v1.Worker/Health"]

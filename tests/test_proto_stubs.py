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
    assert {m.name for m in service.methods} == {"Prefill", "Generate", "Abort", "GetLoad", "Health"}
    assert service.methods_by_name["Generate"].server_streaming
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

"""`--tensor-parallel-size` / `-tp`: one field of ParallelConfig, reaching every command and `LLM`."""

from __future__ import annotations

import argparse

import pytest

from splitserve.shared.config import ConfigError, EngineConfig, ParallelConfig
from splitserve.shared.config_flags import add_engine_flags, engine_config_from_args, engine_flags_to_argv


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv", [("-tp", "2"), ("--tensor-parallel-size", "2")])
def test_short_and_long_flag_set_the_field(argv):
    args = _parse(*argv)
    assert engine_config_from_args(args).parallel == ParallelConfig(tensor_parallel_size=2)
    assert engine_flags_to_argv(args) == ["--tensor-parallel-size", "2"]  # what `up` passes to its workers


def test_default_is_one_rank_and_zero_is_refused():
    assert engine_config_from_args(_parse()).parallel.tensor_parallel_size == 1
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(parallel=ParallelConfig(0)).validate()


def test_every_engine_command_takes_it():
    from splitserve.cli import build_parser

    parser = build_parser()
    for command in (["generate", "--prompt", "x"], ["worker"], ["prefill"], ["decode"], ["up"]):
        assert parser.parse_args([*command, "-tp", "4"]).tensor_parallel_size == 4


@pytest.mark.parametrize("num_gpus,tp,expected", [
    (4, 2, ["cuda:0", "cuda:2", "cuda:0"]), (4, 1, ["cuda:0", "cuda:1", "cuda:2"]),
    (3, 2, ["cuda:0", "cuda:0", "cuda:0"]), (2, 2, []),
])
def test_up_places_each_workers_ranks_on_gpus_of_its_own(monkeypatch, num_gpus, tp, expected):
    import torch

    from splitserve.services.launcher import _worker_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: num_gpus)
    args = argparse.Namespace(worker_devices=None, device="auto", tensor_parallel_size=tp)
    assert _worker_devices(args, 3) == expected


def test_up_sizes_prefill_and_decode_workers_apart(monkeypatch):
    """--prefill-tp / --decode-tp (default -tp) go to each role's workers, last on the command line
    (so they win over -tp), and the GPU placement strides by each worker's own size."""
    import torch

    from splitserve.cli import build_parser
    from splitserve.services.launcher import _worker_children

    args = build_parser().parse_args(["up", "--prefill-tp", "2", "--decode", "2", "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    prefill, decode, colocated = _worker_children(args, ["--tensor-parallel-size", "1"])
    sizes = [c.argv[len(c.argv) - 1 - c.argv[::-1].index("--tensor-parallel-size") + 1] for c in prefill + decode]
    assert sizes == ["2", "1", "1"] and not colocated
    devices = [c.argv[c.argv.index("--device") + 1] for c in prefill + decode]
    assert devices == ["cuda:0", "cuda:2", "cuda:3"]
    # Interleaved sliding-window models: the TP prefill keeps one KV pool, so the decode side does too.
    assert all("--no-split-kv-by-layer-group" in c.argv for c in prefill + decode)
    prefill, decode, _ = _worker_children(build_parser().parse_args(["up"]), [])
    assert not any("--no-split-kv-by-layer-group" in c.argv for c in prefill + decode)


def test_up_refuses_per_role_sizes_for_colocated_workers():
    from splitserve.cli import build_parser
    from splitserve.services.launcher import run_stack

    with pytest.raises(SystemExit, match="colocated workers take -tp"):
        run_stack(build_parser().parse_args(["up", "--colocated", "--decode-tp", "2"]))

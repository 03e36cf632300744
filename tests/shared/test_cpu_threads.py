"""`--cpu-threads` (ParallelConfig.cpu_threads): torch's thread count in the engine, from the flag to
the process that steps the model. Unset, a served engine process on CPU leaves one core to the
serving process and gateway beside it, and `LLM(...)` keeps torch's own count."""

from __future__ import annotations

import argparse

import pytest
import torch

from splitserve.shared.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig
from splitserve.shared.config_flags import add_engine_flags, engine_config_from_args, engine_flags_to_argv
from splitserve.shared.engine_parts import resolve_cpu_threads, usable_cores


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    return parser.parse_args(list(argv))


def test_the_flag_sets_the_field_and_reaches_child_processes():
    args = _parse("--cpu-threads", "3")
    assert engine_config_from_args(args).parallel == ParallelConfig(cpu_threads=3)
    assert engine_flags_to_argv(args) == ["--cpu-threads", "3"]  # what `up` passes to its workers
    assert engine_config_from_args(_parse()).parallel.cpu_threads is None


def test_zero_threads_is_refused_by_name():
    with pytest.raises(ConfigError, match="cpu_threads"):
        EngineConfig(parallel=ParallelConfig(cpu_threads=0)).validate()


def test_unset_a_served_cpu_engine_leaves_one_core_and_llm_keeps_torchs_count():
    cpu = EngineConfig(model=ModelConfig(device="cpu"))
    assert resolve_cpu_threads(cpu, beside_server=True) == max(1, usable_cores() - 1)
    assert resolve_cpu_threads(cpu, beside_server=False) is None
    explicit = EngineConfig(model=ModelConfig(device="cpu"), parallel=ParallelConfig(cpu_threads=5))
    assert resolve_cpu_threads(explicit, beside_server=True) == resolve_cpu_threads(explicit, beside_server=False) == 5


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_llm_applies_the_field_in_its_own_process(checkpoint_factory, restore_torch_threads):
    from splitserve.shared.llm import LLM

    wanted = restore_torch_threads + 1  # differs from what this process runs now
    llm = LLM(checkpoint_factory("llama"), device="cpu", num_blocks=8, block_size=4, cpu_threads=wanted)
    try:
        assert torch.get_num_threads() == wanted
    finally:
        llm.close()


@pytest.mark.slow
def test_the_engine_process_runs_on_the_configured_threads(checkpoint_factory):
    from splitserve.shared.async_engine import AsyncEngine
    from splitserve.shared.config import CacheConfig

    wanted = usable_cores() + 1  # neither torch's default nor the served default
    config = EngineConfig(model=ModelConfig(model=checkpoint_factory("llama"), device="cpu"),
                          cache=CacheConfig(num_blocks=16, block_size=4), parallel=ParallelConfig(cpu_threads=wanted))
    engine = AsyncEngine(config, "colocated")
    try:
        assert engine.torch_threads == wanted
    finally:
        engine.shutdown(timeout_s=120)

"""Start-up of one engine: resolve device and dtype, load the model, size and allocate the KV pool.

The KV pool is one block-major tensor (see docs/architecture.md):
    kv_cache [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
or, for a model whose layers attend differently (interleaved sliding windows) and an engine that
has neither a host tier nor followers, one such tensor per KV layer group
(`kv_caches`, in `model.kv_layer_groups()` order) over the same memory, split so the sliding
groups get only what their windows need (shared/kv/layer_groups.py).
On CUDA it takes what this engine's share of the device (`gpu_memory_utilization`) leaves after its
weights and the measured peak of its largest step; on CPU a fixed `cpu_kv_cache_gib`.

With `tensor_parallel_size` N > 1 this process is rank 0: it starts the N - 1 followers first (they
load their shards beside it), and every rank's pool holds only its kv heads, with rank 0's block
count (its followers allocate the same when the runner binds the pool).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch

from splitserve.shared.config import ConfigError, EngineConfig
from splitserve.shared import huge_pages
from splitserve.shared.demo import resolve_model_dir
from splitserve.shared.kv.layer_groups import LayerGroup, split_layer_blocks
from splitserve.shared.model.loader import ModelInfo, load_hf_config, load_model, model_info
from splitserve.shared.model.layers import num_kv_heads_of
from splitserve.shared.model.parallel_layers import TensorParallelError, check_head_split, kv_heads_per_rank
from splitserve.shared.parallel.driver import NO_FOLLOWERS, Followers, NoFollowers
from splitserve.shared.parallel.follower import FollowerSpec

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineParts:
    model: torch.nn.Module
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    kv_cache: torch.Tensor
    num_blocks: int
    max_model_len: int
    block_size: int
    model_dir: str
    followers: NoFollowers = NO_FOLLOWERS
    """Tensor parallelism: the other ranks, which mirror every model call (NO_FOLLOWERS: one rank)."""
    kv_groups: list[LayerGroup] = field(default_factory=list)
    """The KV layer groups when the pool is split by group (empty: one pool of all layers)."""
    kv_caches: list[torch.Tensor] = field(default_factory=list)
    """One pool per entry of `kv_groups` (`kv_cache` is then group 0's); else `[kv_cache]`."""
    group_num_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.kv_caches:
            self.kv_caches = [self.kv_cache]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "bfloat16" and device.type == "cpu":
        _warn_if_bf16_is_emulated()
    return _DTYPES[name]


@functools.cache
def _warn_if_bf16_is_emulated() -> None:
    from splitserve.kernels import linear_cpu

    if not linear_cpu.native_bf16():
        logger.warning("this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX): bfloat16 runs its linears "
                       "emulated, about 3x slower than float32 (--dtype auto on CPU)")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the whole host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_cpu_threads(config: EngineConfig, beside_server: bool) -> int | None:
    """The torch thread count an engine sets (`ParallelConfig.cpu_threads`); None keeps torch's.

    `beside_server`: the engine process of a served worker, which shares the cores with its serving
    process and the gateway. On CPU it leaves them one core (measured: docs/benchmarks.md section 9)."""
    if config.parallel.cpu_threads is not None:
        return config.parallel.cpu_threads
    if beside_server and resolve_device(config.model.device).type == "cpu":
        return max(1, usable_cores() - 1)
    return None


def apply_cpu_threads(config: EngineConfig, beside_server: bool) -> None:
    threads = resolve_cpu_threads(config, beside_server)
    if threads is not None:
        torch.set_num_threads(threads)


def build_engine_parts(config: EngineConfig, split_kv_by_layer_group: bool = True) -> EngineParts:
    """`split_kv_by_layer_group`: whether the pool may be split per KV layer group (the engine
    says no when the host tier needs the one-pool layout; tensor parallelism keeps one pool too)."""
    mc = config.model
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    model_dir = resolve_model_dir(mc.model)
    followers = start_followers(config, model_dir, device)
    try:
        return _build_on_rank0(config, model_dir, device, dtype, followers, split_kv_by_layer_group)
    except BaseException:
        followers.close()
        raise


def start_followers(config: EngineConfig, model_dir: str, device: torch.device) -> NoFollowers:
    """Tensor parallelism: check the model splits, then spawn the other ranks; NO_FOLLOWERS for one."""
    size = config.parallel.tensor_parallel_size
    if size == 1:
        return NO_FOLLOWERS
    hf_config = load_hf_config(model_dir)
    try:
        check_head_split(hf_config.num_attention_heads, num_kv_heads_of(hf_config), size)
    except TensorParallelError as exc:
        raise ConfigError(str(exc)) from exc
    mc = config.model
    spec = FollowerSpec(model_dir, mc.dtype, str(device), mc.load_format, mc.seed, size, store_port=0)
    return Followers(spec, device)


def _build_on_rank0(config: EngineConfig, model_dir: str, device: torch.device, dtype: torch.dtype,
                    followers: NoFollowers, split_kv_by_layer_group: bool) -> EngineParts:
    mc, cc = config.model, config.cache
    try:
        model, hf_config = load_model(model_dir, dtype=dtype, device=device, load_format=mc.load_format, seed=mc.seed)
    except TensorParallelError as exc:  # a matrix that does not split (the heads were checked first)
        raise ConfigError(str(exc)) from exc
    info = model_info(hf_config, model_dir)
    kv_heads = kv_heads_per_rank(info.num_kv_heads, followers.world_size)  # this rank's
    max_model_len = mc.max_model_len or info.max_position_embeddings
    if max_model_len > info.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                          f"{info.max_position_embeddings}")
    block_bytes = info.num_layers * 2 * cc.block_size * kv_heads * info.head_dim * dtype.itemsize
    if cc.num_blocks:
        num_blocks = cc.num_blocks
    elif device.type == "cuda":
        num_blocks = _num_blocks_on_gpu(config, model, info, kv_heads, device, dtype, block_bytes, followers)
    else:
        num_blocks = max(1, int(cc.cpu_kv_cache_gib * 2**30) // block_bytes)
    groups = model.kv_layer_groups()
    if len(groups) > 1 and split_kv_by_layer_group and followers.world_size == 1:
        return _build_grouped(config, model, info, device, dtype, num_blocks, max_model_len, groups, model_dir)
    if len(groups) > 1:  # said once at start-up: this model's sliding layers save no memory here
        logger.info("KV pool not split by layer group (%s): one pool of every layer's blocks; a P/D peer must "
                    "keep one pool too", "tensor parallelism" if split_kv_by_layer_group else
                    "--no-split-kv-by-layer-group or the host tier")
    max_model_len = _cap_max_model_len(max_model_len, num_blocks, cc.block_size)
    kv_cache = huge_pages.zeros(num_blocks, info.num_layers, 2, cc.block_size, kv_heads, info.head_dim,
                                dtype=dtype, device=device)
    logger.info("KV pool: %d blocks x %d tokens (%.1f MiB) on %s, %s%s", num_blocks, cc.block_size,
                num_blocks * block_bytes / 2**20, device, dtype,
                f", {kv_heads} kv heads on each of {followers.world_size} ranks" if followers.world_size > 1 else "")
    return EngineParts(model, info, device, dtype, kv_cache, num_blocks, max_model_len, cc.block_size, model_dir,
                       followers)


def _cap_max_model_len(max_model_len: int, num_blocks: int, block_size: int) -> int:
    if num_blocks < -(-max_model_len // block_size):
        logger.warning("KV pool of %d blocks holds only %d tokens; capping max_model_len %d to that",
                       num_blocks, num_blocks * block_size, max_model_len)
        return num_blocks * block_size
    return max_model_len


def _build_grouped(config: EngineConfig, model: torch.nn.Module, info: ModelInfo, device: torch.device,
                   dtype: torch.dtype, num_blocks: int, max_model_len: int, groups: list[LayerGroup],
                   model_dir: str) -> EngineParts:
    """One pool per KV layer group, from the memory `num_blocks` one-pool blocks would take."""
    cc, sc = config.cache, config.scheduler
    counts = split_layer_blocks(num_blocks * info.num_layers, groups, cc.block_size, sc.max_num_seqs,
                                sc.max_num_batched_tokens)
    # A group left at the one-pool share (or the full group) bounds one sequence, as one pool would.
    max_model_len = _cap_max_model_len(max_model_len, min(c for c in counts if c >= num_blocks), cc.block_size)
    caches = [huge_pages.zeros(n, len(layers), 2, cc.block_size, info.num_kv_heads, info.head_dim, dtype=dtype,
                               device=device) for n, (_, layers) in zip(counts, groups)]
    split = ", ".join(f"{'full' if w is None else f'window {w}'} ({len(layers)} layers): {n} blocks"
                      for n, (w, layers) in zip(counts, groups))
    logger.info("KV pool split by layer group on %s, %s (%.1f MiB): %s; group 0 holds %d tokens, one pool of "
                "the same memory %d", device, dtype, sum(c.numel() for c in caches) * dtype.itemsize / 2**20,
                split, counts[0] * cc.block_size, num_blocks * cc.block_size)
    return EngineParts(model, info, device, dtype, caches[0], counts[0], max_model_len, cc.block_size, model_dir,
                       kv_groups=groups, kv_caches=caches, group_num_blocks=counts)


NON_TORCH_BYTES = 1 * 2**30
"""Memory of this process outside torch's allocator: the CUDA context, cuBLAS and Triton modules."""

GRAPH_AND_WORKSPACE_BYTES = 512 * 2**20
"""Kept free beyond the profiled peak: CUDA graphs' memory pool (captured after the KV pool) and
library workspaces that appear later."""


def _num_blocks_on_gpu(config: EngineConfig, model: torch.nn.Module, info: ModelInfo, kv_heads: int,
                       device: torch.device, dtype: torch.dtype, block_bytes: int, followers: NoFollowers) -> int:
    peak = _profile_peak_step_bytes(config, model, info, kv_heads, device, dtype, followers)
    free_now, total = torch.cuda.mem_get_info(device)
    # What this process holds: the allocator's memory (weights) plus what lives outside it. Not
    # measured as a drop in free memory, which would also count a second engine starting on the
    # same GPU at the same moment (a disaggregated pair on one device does exactly that).
    own = torch.cuda.memory_reserved(device) + NON_TORCH_BYTES
    budget = kv_cache_budget_bytes(total, free_now, config.cache.gpu_memory_utilization, own,
                                   peak + GRAPH_AND_WORKSPACE_BYTES)
    logger.info("GPU memory: %.1f GiB total, %.1f GiB free; this engine holds %.1f GiB, its largest step "
                "peaks at %.2f GiB; KV pool %.1f GiB", total / 2**30, free_now / 2**30, own / 2**30,
                peak / 2**30, budget / 2**30)
    if budget < block_bytes:
        raise ConfigError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization {config.cache.gpu_memory_utilization} "
            f"of {total / 2**30:.1f} GiB, this engine already holds {own / 2**30:.1f} GiB and its largest step "
            f"needs {peak / 2**30:.2f} GiB; {free_now / 2**30:.1f} GiB is free on the device. Raise "
            f"gpu_memory_utilization, lower max_num_batched_tokens, or free the device")
    return int(budget // block_bytes)


def kv_cache_budget_bytes(total: int, free: int, utilization: float, own: int, headroom: int) -> int:
    """Bytes the KV pool may take. As in vLLM, `utilization` is this engine's share of the device:
    other processes' memory does not count against it (two engines at 0.45 share one GPU), but the
    pool never takes more than is free now. `own` is what the engine already holds; `headroom` its
    peak step activations plus graph and workspace memory."""
    return int(min(total * utilization - own, free) - headroom)


def _profile_peak_step_bytes(config: EngineConfig, model: torch.nn.Module, info: ModelInfo, kv_heads: int,
                             device: torch.device, dtype: torch.dtype, followers: NoFollowers) -> int:
    """Peak memory of the largest step, measured: run it against a 1-block KV cache (nothing is
    written), plus the sampler's fp32 work tensors for a full batch of rows, which the profiled
    step (two sampled rows) does not reach: logits, log-probabilities, sorted values and indices
    for top-k/top-p, probabilities and noise, about six [max_num_seqs, vocab] tensors."""
    from splitserve.shared.runner import run_fake_mixed_step

    cc, sc = config.cache, config.scheduler
    tiny = torch.zeros(1, info.num_layers, 2, cc.block_size, kv_heads, info.head_dim, dtype=dtype, device=device)
    model.bind_kv_cache(tiny)
    followers.bind_kv(1, cc.block_size)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    followers.fake_step(max(sc.max_num_batched_tokens, 2), cc.block_size)
    run_fake_mixed_step(model, max(sc.max_num_batched_tokens, 2), cc.block_size, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del tiny
    torch.cuda.empty_cache()
    return peak + 6 * sc.max_num_seqs * info.vocab_size * 4

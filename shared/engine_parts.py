"""Start-up of one engine: resolve device and dtype, load the model, size and allocate the KV pool.

The KV pool is one block-major tensor (see docs/architecture.md):
    kv_cache [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
On CUDA it takes what `gpu_memory_utilization` leaves after the weights and a profiled peak
activation; on CPU a fixed `cpu_kv_cache_gib`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.shared.config import ConfigError, EngineConfig
from splitserve.shared.model.loader import ModelInfo, load_model, model_info

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
    return _DTYPES[name]


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        from splitserve.shared.demo import ensure_demo_checkpoint

        return ensure_demo_checkpoint()
    return model


def build_engine_parts(config: EngineConfig) -> EngineParts:
    mc, cc = config.model, config.cache
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    model_dir = resolve_model_dir(mc.model)
    model, hf_config = load_model(model_dir, dtype=dtype, device=device, load_format=mc.load_format, seed=mc.seed)
    info = model_info(hf_config, model_dir)
    max_model_len = mc.max_model_len or info.max_position_embeddings
    if max_model_len > info.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                          f"{info.max_position_embeddings}")
    block_bytes = info.num_layers * 2 * cc.block_size * info.num_kv_heads * info.head_dim * dtype.itemsize
    num_blocks = cc.num_blocks or _num_blocks_from_memory(config, device, block_bytes, hf_config)
    blocks_per_seq = -(-max_model_len // cc.block_size)
    if num_blocks < blocks_per_seq:
        logger.warning("KV pool of %d blocks holds only %d tokens; capping max_model_len %d to that",
                       num_blocks, num_blocks * cc.block_size, max_model_len)
        max_model_len = num_blocks * cc.block_size
    kv_cache = torch.zeros(num_blocks, info.num_layers, 2, cc.block_size, info.num_kv_heads, info.head_dim,
                           dtype=dtype, device=device)
    logger.info("KV pool: %d blocks x %d tokens (%.1f MiB) on %s, %s", num_blocks, cc.block_size,
                num_blocks * block_bytes / 2**20, device, dtype)
    return EngineParts(model, info, device, dtype, kv_cache, num_blocks, max_model_len, cc.block_size, model_dir)


def _num_blocks_from_memory(config: EngineConfig, device: torch.device, block_bytes: int, hf_config) -> int:
    if device.type != "cuda":
        return max(1, int(config.cache.cpu_kv_cache_gib * 2**30) // block_bytes)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Leave room for activations of the largest step: a rough, safe reserve of logits + MLP
    # intermediates for max_num_batched_tokens (profiling exactly is future work).
    reserve = _activation_reserve_bytes(config, hf_config)
    budget = total * config.cache.gpu_memory_utilization - used - reserve
    if budget < block_bytes:
        raise ConfigError(f"no GPU memory left for the KV cache (total {total/2**30:.1f} GiB, in use "
                          f"{used/2**30:.1f} GiB, reserve {reserve/2**30:.1f} GiB): raise gpu_memory_utilization")
    return int(budget // block_bytes)


def _activation_reserve_bytes(config: EngineConfig, hf_config) -> int:
    tokens = config.scheduler.max_num_batched_tokens
    hidden, inter, vocab = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    per_token = 2 * (4 * hidden + 3 * inter) + 4 * vocab / 8  # bf16 activations; logits only for sampled rows
    return int(tokens * per_token * 2 + 512 * 2**20)

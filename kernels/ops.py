"""The one entry point the model calls for every custom op.

Dispatch rule: Triton kernels for CUDA tensors (when Triton imports); on CPU the C kernels of
`elementwise_cpu.py` where they take the tensors, else the plain-torch `*_ref` references, and for
attention `paged_attention_cpu`, which batches decode rows. Tests of
the kernels on CPU call the Triton wrappers directly under `TRITON_INTERPRET=1`; setting
`FORCE_TRITON = True` also routes CPU tensors here through the interpreter (it must be set before
importing triton, so the flag refuses to work without it).
"""

from __future__ import annotations

import os

import torch

from splitserve.kernels import activation, elementwise_cpu as _cpu, fused_moe as _moe, kv_cache_write, linear_cpu
from splitserve.kernels import paged_attention as _attention, paged_attention_cpu as _attention_cpu
from splitserve.kernels import moe_route as _route, rms_norm as _norm, rotary
from splitserve.kernels.rotary import compute_cos_sin_cache
from splitserve.kernels.triton_import import HAS_TRITON

# Route CPU tensors through the Triton interpreter too (tests / debugging only).
FORCE_TRITON = False

__all__ = [
    "act_and_mul",
    "compute_cos_sin_cache",
    "fused_add_rms_norm",
    "fused_moe",
    "linear",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "route_topk",
    "silu_and_mul",
    "use_triton",
    "write_kv_cache",
]


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on `tensor` should run the Triton kernel rather than the reference."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    if FORCE_TRITON:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("ops.FORCE_TRITON on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
        return True
    return False


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """`q [T, Hq, D]` over the paged cache -> `[T, Hq, D]`; see `kernels/paged_attention.py` (layout,
    Triton) and `kernels/paged_attention_cpu.py`."""
    fn = _attention.paged_attention if use_triton(q) else _attention_cpu.paged_attention_cpu
    return fn(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
        logit_softcap=logit_softcap, max_query_len=max_query_len, max_seq_len=max_seq_len,
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x W^T + b`: torch's on CUDA; on CPU bf16 through a weight reordered once (linear_cpu.py)."""
    return torch.nn.functional.linear(x, weight, bias) if x.is_cuda else linear_cpu.linear(x, weight, bias)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter `k, v [T, Hkv, D]` into the cache at `slot_mapping [T]` (negative = skip), in place."""
    if use_triton(k):
        kv_cache_write.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    elif not _cpu.write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
        kv_cache_write.write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x [T, H]` -> `[T, H]`, HF LlamaRMSNorm numerics; `x [T, N, D]` normalises each head over D."""
    if use_triton(x):
        return _norm.rms_norm(x, weight, eps)
    native = _cpu.rms_norm(x, None, weight, eps)
    return _norm.rms_norm_ref(x, weight, eps) if native is None else native[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(rms_norm(x + residual), x + residual)` as new tensors."""
    if use_triton(x):
        return _norm.fused_add_rms_norm(x, residual, weight, eps)
    native = _cpu.rms_norm(x, residual, weight, eps)
    return _norm.fused_add_rms_norm_ref(x, residual, weight, eps) if native is None else native


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary on `q [T, Hq, D]`, `k [T, Hkv, D]`; returns new tensors."""
    if use_triton(q):
        return rotary.rotary_embedding(positions, q, k, cos_sin_cache)
    native = _cpu.rotary_embedding(positions, q, k, cos_sin_cache)
    return rotary.rotary_embedding_ref(positions, q, k, cos_sin_cache) if native is None else native


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`x [T, 2I]` -> `silu(x[:, :I]) * x[:, I:]`."""
    return act_and_mul(x, "silu")


_ACT_AND_MUL_REFS = {"silu": activation.silu_and_mul_ref, "gelu_pytorch_tanh": activation.gelu_tanh_and_mul_ref}


def act_and_mul(x: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """`x [T, 2I]` -> `act(x[:, :I]) * x[:, I:]` for `hidden_act` "silu" or "gelu_pytorch_tanh"."""
    if use_triton(x):
        return activation.act_and_mul(x, hidden_act)
    native = _cpu.silu_and_mul(x) if hidden_act == "silu" else None
    return _ACT_AND_MUL_REFS[hidden_act](x) if native is None else native


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`router_logits [T, E]` -> `(weights [T, k] fp32, ids [T, k] int64)`: softmax, top k,
    renormalised if asked; see `kernels/moe_route.py`."""
    fn = _route.route_topk if use_triton(router_logits) else _route.route_topk_ref
    return fn(router_logits, top_k, renormalize)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """`x [T, H]` through its top-k experts of `w13 [E, 2I, H]`, `w2 [E, H, I]` -> `[T, H]`;
    see `kernels/fused_moe.py`."""
    fn = _moe.fused_moe if use_triton(x) else _moe.fused_moe_ref
    return fn(x, w13, w2, topk_weights, topk_ids, activation)

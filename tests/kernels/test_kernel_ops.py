"""`kernels.ops` dispatch: references for CPU tensors, Triton when forced under the interpreter."""

from __future__ import annotations

import torch

from conftest import needs_triton
from paged_batch import make_paged_batch
from splitserve.kernels import ops
from splitserve.kernels.paged_attention import paged_attention_ref
from splitserve.kernels.paged_attention_cpu import paged_attention_cpu


def test_cpu_tensors_use_the_torch_paths():
    x = torch.randn(2, 8)
    assert not ops.use_triton(x)
    batch = make_paged_batch([1, 3, 1], [9, 3, 5], 4, 2, 32)
    torch.testing.assert_close(ops.paged_attention(*batch.args()), paged_attention_cpu(*batch.args()), atol=0, rtol=0)


@needs_triton
def test_force_triton_runs_every_op_through_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "FORCE_TRITON", True)
    assert ops.use_triton(torch.randn(1))
    batch = make_paged_batch([1, 3], [9, 3], 4, 2, 32)
    out = ops.paged_attention(*batch.args(), max_query_len=3, max_seq_len=9)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args()), atol=1e-4, rtol=1e-4)
    x, w = torch.randn(3, 32), torch.randn(32)
    normed, residual = ops.fused_add_rms_norm(x, x, w, 1e-6)
    torch.testing.assert_close(normed, ops.rms_norm(residual, w, 1e-6))
    torch.testing.assert_close(ops.silu_and_mul(torch.cat([x, x], 1)), torch.nn.functional.silu(x) * x)
    cache = ops.compute_cos_sin_cache(torch.rand(16), 8)
    q_out, k_out = ops.rotary_embedding(torch.zeros(3, dtype=torch.long), x.view(3, 1, 32), x.view(3, 1, 32), cache)
    torch.testing.assert_close(q_out, x.view(3, 1, 32))  # position 0 is the identity rotation
    k_cache = torch.zeros(2, 4, 1, 32)
    ops.write_kv_cache(x.view(3, 1, 32), x.view(3, 1, 32), k_cache, k_cache.clone(), torch.tensor([0, 5, -1]))
    torch.testing.assert_close(k_cache[1, 1, 0], x[1])


@needs_triton
def test_fused_moe_dispatches_by_device_and_force_flag(monkeypatch):
    from splitserve.kernels.fused_moe import fused_moe_ref

    x, w13, w2 = torch.randn(5, 32), torch.randn(4, 32, 32) * 0.2, torch.randn(4, 32, 16) * 0.2
    weights, ids = torch.topk(torch.softmax(torch.randn(5, 4), -1), 2, dim=-1)
    ref = fused_moe_ref(x, w13, w2, weights, ids, "silu")
    torch.testing.assert_close(ops.fused_moe(x, w13, w2, weights, ids), ref, atol=0, rtol=0)
    monkeypatch.setattr(ops, "FORCE_TRITON", True)
    torch.testing.assert_close(ops.fused_moe(x, w13, w2, weights, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops.act_and_mul(torch.cat([x, x], 1), "gelu_pytorch_tanh"),
                               torch.nn.functional.gelu(x, approximate="tanh") * x, atol=1e-5, rtol=1e-5)

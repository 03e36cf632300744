"""The C versions of a layer's small ops (`kernels/elementwise_cpu.c`, compiled here with the
machine's C compiler) against the torch references they stand in for: rotary and the cache write
bit for bit in fp32 and bf16, RMSNorm and SwiGLU in bf16 (element for element, with at most one
bf16 step apart where the fp32 arithmetic's last bits round differently), and the dispatch in
`ops.py` that picks them."""

from __future__ import annotations

import shutil

import pytest
import torch

from splitserve.kernels import activation, elementwise_cpu, kv_cache_write, ops, paged_decode_cpu, rms_norm, rotary
from splitserve.shared.llm import LLM
from splitserve.shared.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def switched_off(monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CPU_NATIVE", "0")
    elementwise_cpu._library.cache_clear()
    yield
    monkeypatch.delenv("SPLITSERVE_CPU_NATIVE")
    elementwise_cpu._library.cache_clear()


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def assert_within_steps(out: torch.Tensor, ref: torch.Tensor, steps: int = 1) -> None:
    """bf16 results equal but for a few elements, each at most `steps` rounding steps (2^-7
    relative each) away. RMSNorm's reference rounds twice (the normalised row, then its product
    with the weight), so a scale one fp32 ulp off, from another summation order (the vector width
    differs between CPUs), can move an element by two steps."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    differ = out != ref
    assert differ.float().mean() <= 0.01
    gap = (out.float() - ref.float()).abs()[differ]
    assert torch.all(gap <= ref.float().abs()[differ] * steps * 2**-7 + 1e-30)


def test_the_library_builds_and_loads():
    assert elementwise_cpu._library() is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_rotary_is_bit_identical_on_strided_heads(poison_outputs, dtype, head_dim):
    poison_outputs(elementwise_cpu)
    qkv = randn(9, 6 + 2 + 2, head_dim, dtype=dtype, seed=head_dim)  # q, k: views into one buffer
    q, k = qkv[:, :6], qkv[:, 6:8]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = rotary.compute_cos_sin_cache(inv_freq, 300, attention_scaling=1.3)
    positions = torch.tensor([0, 1, 299, 7, 7, 150, 3, 64, 200], dtype=torch.int32)
    out_q, out_k = elementwise_cpu.rotary_embedding(positions, q, k, cache)
    ref_q, ref_k = rotary.rotary_embedding_ref(positions, q, k, cache)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert out_q.is_contiguous() and out_q.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cache_write_is_bit_identical_and_skips_negative_slots(dtype):
    pool = randn(12, 3, 2, 8, 2, 16, dtype=dtype, seed=1)  # [blocks, layers, K/V, block, heads, dim]
    expected = pool.clone()
    kv = randn(7, 2 + 2 + 2, 16, dtype=dtype, seed=2)
    k, v = kv[:, 2:4], kv[:, 4:6]
    slots = torch.tensor([5, -1, 95, 40, -1, 0, 63])
    assert elementwise_cpu.write_kv_cache(k, v, pool[:, 1, 0], pool[:, 1, 1], slots)
    kv_cache_write.write_kv_cache_ref(k, v, expected[:, 1, 0], expected[:, 1, 1], slots)
    assert torch.equal(pool, expected)  # the other layers' blocks and the skipped slots untouched


def test_the_cache_write_leaves_mixed_dtypes_to_the_reference():
    pool = torch.zeros(4, 1, 2, 8, 2, 16, dtype=torch.bfloat16)
    k = randn(3, 2, 16)
    assert not elementwise_cpu.write_kv_cache(k, k, pool[:, 0, 0], pool[:, 0, 1], torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("hidden", [256, 1000, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_in_bf16_agrees_with_the_reference(poison_outputs, hidden, with_residual):
    poison_outputs(elementwise_cpu)
    x = randn(33, hidden, dtype=torch.bfloat16, seed=hidden, scale=3.0)
    residual = randn(33, hidden, dtype=torch.bfloat16, seed=hidden + 1) if with_residual else None
    weight = randn(hidden, dtype=torch.bfloat16, seed=7, scale=0.5) + 1
    normed, summed = elementwise_cpu.rms_norm(x, residual, weight, 1e-6)
    if with_residual:
        ref_normed, ref_summed = rms_norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
        assert torch.equal(summed, ref_summed)  # an add rounded once: exact
    else:
        ref_normed = rms_norm.rms_norm_ref(x, weight, 1e-6)
        assert summed is None
    assert_within_steps(normed, ref_normed, steps=2)


def test_rms_norm_reads_strided_rows():
    wide = randn(5, 512, dtype=torch.bfloat16, seed=3)
    x, weight = wide[:, 100:356], randn(256, dtype=torch.bfloat16, seed=4)
    assert_within_steps(elementwise_cpu.rms_norm(x, None, weight, 1e-5)[0], rms_norm.rms_norm_ref(x, weight, 1e-5), steps=2)


@pytest.mark.parametrize("inter", [688, 1000, 5])
def test_silu_and_mul_in_bf16_agrees_with_the_reference(poison_outputs, inter):
    poison_outputs(elementwise_cpu)
    x = randn(17, 2 * inter, dtype=torch.bfloat16, seed=inter, scale=4.0)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps and the signed zero
    assert_within_steps(elementwise_cpu.silu_and_mul(x), activation.silu_and_mul_ref(x))


def test_fp32_norms_and_activations_stay_on_the_reference():
    """fp32 is the CPU's parity mode: the references keep transformers' order of operations."""
    x = randn(4, 64)
    assert elementwise_cpu.rms_norm(x, None, torch.ones(64), 1e-5) is None
    assert elementwise_cpu.silu_and_mul(x) is None


def test_switched_off_every_op_is_left_to_the_reference(switched_off):
    x = randn(4, 2, 64, dtype=torch.bfloat16)
    cache = rotary.compute_cos_sin_cache(torch.ones(32), 8)
    assert elementwise_cpu.rotary_embedding(torch.arange(4), x, x, cache) is None
    assert elementwise_cpu.silu_and_mul(x[:, 0]) is None
    assert elementwise_cpu.rms_norm(x[:, 0], None, torch.ones(64, dtype=torch.bfloat16), 1e-5) is None
    pool = torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16)
    assert not elementwise_cpu.write_kv_cache(x, x, pool, pool, torch.arange(4))


def test_ops_dispatch_to_it_on_cpu_and_fall_back_where_it_declines(monkeypatch):
    calls = []
    real = elementwise_cpu.rms_norm
    monkeypatch.setattr(elementwise_cpu, "rms_norm", lambda *a: calls.append(a[0].dtype) or real(*a))
    weight = torch.ones(64, dtype=torch.bfloat16)
    x16 = randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x16, weight, 1e-5), elementwise_cpu.rms_norm(x16, None, weight, 1e-5)[0])
    x32 = randn(3, 64)
    assert torch.equal(ops.rms_norm(x32, weight.float(), 1e-5), rms_norm.rms_norm_ref(x32, weight.float(), 1e-5))
    heads = randn(3, 2, 64)  # [T, N, D]: a per-head norm, which the C file does not take
    assert torch.equal(ops.rms_norm(heads, weight.float(), 1e-5), rms_norm.rms_norm_ref(heads, weight.float(), 1e-5))
    assert calls[:1] == [torch.bfloat16] and torch.float32 in calls


def test_a_bf16_engine_generates_the_same_greedy_tokens_with_and_without_it(checkpoint_factory, monkeypatch):
    """Every C kernel on (these and the decode attention) against every one off, in bf16."""
    prompts = ["x = 1", "def f(a, b):", "import os\nimport sys\n" * 4]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def generate():
        for library in (elementwise_cpu._library, paged_decode_cpu._library):
            library.cache_clear()
        llm = LLM(checkpoint_factory("llama"), device="cpu", dtype="bfloat16", num_blocks=64, block_size=4)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    native = generate()
    monkeypatch.setenv("SPLITSERVE_CPU_NATIVE", "0")
    try:
        reference = generate()
    finally:
        monkeypatch.delenv("SPLITSERVE_CPU_NATIVE")
        for library in (elementwise_cpu._library, paged_decode_cpu._library):
            library.cache_clear()
    assert native == reference and all(len(tokens) == 24 for tokens in native)

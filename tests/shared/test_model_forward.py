"""Our Llama-family model against transformers on the same tiny checkpoints.

Each test runs our model over a small fp32 paged KV pool (block size 4, scattered block ids, so
cache reads cross non-adjacent blocks) and compares logits with
`AutoModelForCausalLM.from_pretrained(dir)(input_ids).logits` on the full sequence.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.shared.model import AttentionMetadata, UnsupportedRopeError, load_model, model_info

BLOCK_SIZE = 4
NUM_BLOCKS = 16
TOLERANCE = 1e-4


def _hf_logits(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0]  # [T, V]


def _prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedRun:
    """Our model plus a KV pool; `step` runs one batch of (request, new token ids) chunks."""

    def __init__(self, model_dir: str) -> None:
        self.model, hf_config = load_model(model_dir, torch.float32, torch.device("cpu"))
        info = model_info(hf_config)
        self.kv_cache = torch.zeros(NUM_BLOCKS, info.num_layers, 2, BLOCK_SIZE, info.num_kv_heads, info.head_dim)
        self.model.bind_kv_cache(self.kv_cache)
        self.vocab_size = info.vocab_size
        self.num_computed: dict[str, int] = {}
        # Deliberately scattered, non-monotonic block ids.
        self.block_tables = {"a": [9, 2, 14, 5, 11, 0], "b": [3, 12, 7, 1, 15, 6]}

    def step(self, chunks: list[tuple[str, list[int]]]) -> torch.Tensor:
        """Returns logits [T, V] of every new token of the step."""
        query_lens = [len(ids) for _, ids in chunks]
        seq_lens = [self.num_computed.get(r, 0) + len(ids) for r, ids in chunks]
        attn = AttentionMetadata.build(query_lens, seq_lens, [self.block_tables[r] for r, _ in chunks], BLOCK_SIZE)
        input_ids = torch.tensor([t for _, ids in chunks for t in ids])
        positions = torch.tensor([p for s, q in zip(seq_lens, query_lens) for p in range(s - q, s)])
        with torch.no_grad():
            logits = self.model.compute_logits(self.model(input_ids, positions, attn))
        for (request, _), seq_len in zip(chunks, seq_lens):
            self.num_computed[request] = seq_len
        return logits


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < TOLERANCE, f"max abs logit difference {diff}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_full_prefill_matches_transformers(tiny_checkpoint):
    _, model_dir = tiny_checkpoint
    run = PagedRun(model_dir)
    prompt = _prompt(run.vocab_size, 13)
    _assert_close(run.step([("a", prompt)]), _hf_logits(model_dir, prompt))


def test_prefill_then_decode_reads_paged_cache(tiny_checkpoint):
    _, model_dir = tiny_checkpoint
    run = PagedRun(model_dir)
    prompt = _prompt(run.vocab_size, 13, seed=1)
    expected = _hf_logits(model_dir, prompt)
    _assert_close(run.step([("a", prompt[:-1])]), expected[:-1])
    _assert_close(run.step([("a", prompt[-1:])]), expected[-1:])


def test_mixed_batch_of_chunked_prefill_and_decode(checkpoint_factory):
    """One step holding request a's second prefill chunk and request b's decode token."""
    model_dir = checkpoint_factory("qwen3")
    run = PagedRun(model_dir)
    a, b = _prompt(run.vocab_size, 11, seed=2), _prompt(run.vocab_size, 9, seed=3)
    expected_a, expected_b = _hf_logits(model_dir, a), _hf_logits(model_dir, b)
    run.step([("a", a[:5]), ("b", b[:-1])])
    logits = run.step([("b", b[-1:]), ("a", a[5:])])
    _assert_close(logits[:1], expected_b[-1:])
    _assert_close(logits[1:], expected_a[5:])


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64}}),
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
    ],
    ids=["tied", "llama-biases", "llama3-rope", "linear-rope", "yarn-rope", "mistral-window",
         "qwen2-window-layers", "qwen3-tied-bias"],
)
def test_variants_match_transformers(checkpoint_factory, arch, overrides):
    model_dir = checkpoint_factory(arch, **overrides)
    run = PagedRun(model_dir)
    prompt = _prompt(run.vocab_size, 14, seed=4)
    expected = _hf_logits(model_dir, prompt)
    _assert_close(run.step([("a", prompt[:9])]), expected[:9])
    for i in range(9, 14):  # decode steps: the sliding window moves past whole blocks
        _assert_close(run.step([("a", prompt[i : i + 1])]), expected[i : i + 1])


def test_unsupported_rope_type_is_named(checkpoint_factory):
    model_dir = checkpoint_factory("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedRopeError, match="'dynamic'"):
        load_model(model_dir, torch.float32, torch.device("cpu"))


def test_forward_without_bound_cache_fails_clearly(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("llama"), torch.float32, torch.device("cpu"))
    attn = AttentionMetadata.build([2], [2], [[0]], BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), attn)


def test_partial_rotary_rotates_only_the_leading_channels():
    from splitserve.shared.model.layers import RotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    partial = RotaryEmbedding(head_dim=16, rotary_dim=8, max_positions=32, rope=rope)
    full_of_8 = RotaryEmbedding(head_dim=8, rotary_dim=8, max_positions=32, rope=rope)
    positions = torch.tensor([0, 3, 31])
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    q_out, k_out = partial(positions, q, k)
    q_ref, k_ref = full_of_8(positions, q[..., :8], k[..., :8])
    assert torch.equal(q_out[..., 8:], q[..., 8:]) and torch.equal(k_out[..., 8:], k[..., 8:])
    assert torch.allclose(q_out[..., :8], q_ref) and torch.allclose(k_out[..., :8], k_ref)
    assert not torch.allclose(q_out[1:, :, :8], q[1:, :, :8])  # positions > 0 do rotate


def test_family_matches_transformers(family_checkpoint):
    """Every other family: a prefill then decode steps past the sliding windows, logits against HF."""
    _, model_dir = family_checkpoint
    run = PagedRun(model_dir)
    prompt = _prompt(run.vocab_size, 16, seed=5)
    expected = _hf_logits(model_dir, prompt)
    _assert_close(run.step([("a", prompt[:11])]), expected[:11])
    for i in range(11, 16):
        _assert_close(run.step([("a", prompt[i : i + 1])]), expected[i : i + 1])

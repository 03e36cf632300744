"""Checkpoint loading: every architecture, sharded and tied checkpoints, dummy weights, clear
errors for broken checkpoint directories, and the demo checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.shared.demo import DEMO_VERSION, ensure_demo_checkpoint
from splitserve.shared.model import (
    CheckpointError,
    UnsupportedArchitectureError,
    WeightLoadError,
    load_model,
    model_info,
)

CPU = torch.device("cpu")


def _hf_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def _assert_weights_equal(model, hf: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(ours[p + "self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        assert torch.equal(ours[p + "mlp.gate_up_proj.weight"], gate_up)
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            assert torch.equal(ours[p + name], hf[p + name]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], hf[name]), name


def _copy_checkpoint(src: str, dst) -> str:
    return shutil.copytree(src, str(dst / "ckpt"))


def test_each_architecture_loads_hf_weights(tiny_checkpoint):
    arch, model_dir = tiny_checkpoint
    model, hf_config = load_model(model_dir, torch.float32, CPU)
    _assert_weights_equal(model, _hf_state_dict(model_dir))
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    if arch == "qwen3":
        assert hf_config.head_dim == 32 != hf_config.hidden_size // hf_config.num_attention_heads
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (32,)


def test_sharded_checkpoint_loads(checkpoint_factory):
    model_dir = checkpoint_factory("llama", max_shard_size="300KB")
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(model_dir) if n.endswith(".safetensors")]) > 1
    model, _ = load_model(model_dir, torch.float32, CPU)
    _assert_weights_equal(model, _hf_state_dict(model_dir))


def test_tied_embeddings_share_one_tensor(checkpoint_factory):
    model_dir = checkpoint_factory("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(os.path.join(model_dir, "model.safetensors"))
    model, _ = load_model(model_dir, torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_weights_equal(model, _hf_state_dict(model_dir))


def test_loads_in_lower_precision_with_fp32_rope_table(tiny_checkpoint):
    _, model_dir = tiny_checkpoint
    model, _ = load_model(model_dir, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # the loader restores the default


def test_model_info(checkpoint_factory):
    model_dir = checkpoint_factory("qwen3")
    _, hf_config = load_model(model_dir, torch.float32, CPU, load_format="dummy")
    info = model_info(hf_config)
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (2, 2, 32)
    assert info.vocab_size == hf_config.vocab_size
    assert info.max_position_embeddings == 256
    assert info.eos_token_ids == (hf_config.eos_token_id,)


def test_missing_directory_and_config(tmp_path, checkpoint_factory):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), torch.float32, CPU)
    model_dir = _copy_checkpoint(checkpoint_factory("llama"), tmp_path)
    os.remove(os.path.join(model_dir, "config.json"))
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(model_dir, torch.float32, CPU)


def test_missing_weight_files(tmp_path, checkpoint_factory):
    model_dir = _copy_checkpoint(checkpoint_factory("llama"), tmp_path)
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(model_dir, torch.float32, CPU)
    model, _ = load_model(model_dir, torch.float32, CPU, load_format="dummy")  # config alone is enough
    assert model is not None


def test_missing_shard_is_named(tmp_path, checkpoint_factory):
    model_dir = _copy_checkpoint(checkpoint_factory("llama", max_shard_size="300KB"), tmp_path)
    shard = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.join(model_dir, shard))
    with pytest.raises(CheckpointError, match=shard):
        load_model(model_dir, torch.float32, CPU)


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path, checkpoint_factory):
    model_dir = _copy_checkpoint(checkpoint_factory("llama"), tmp_path)
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForSequenceClassification"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification.*Qwen3ForCausalLM"):
        load_model(model_dir, torch.float32, CPU)


@pytest.mark.parametrize("edit", ["drop", "extra", "reshape"])
def test_weight_mismatches_are_named(tmp_path, checkpoint_factory, edit):
    model_dir = _copy_checkpoint(checkpoint_factory("qwen2"), tmp_path)
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.bias"
    if edit == "drop":
        del tensors[name]
        expected = r"missing 1 weights: model\.layers\.1\.self_attn\.qkv_proj\.bias\[k\]"
    elif edit == "extra":
        tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
        expected = "model.layers.1.self_attn.extra.weight"
    else:
        tensors[name] = torch.zeros(3)
        expected = name
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=expected):
        load_model(model_dir, torch.float32, CPU)


def test_dummy_weights_are_seeded(checkpoint_factory):
    model_dir = checkpoint_factory("qwen3")
    a, cfg = load_model(model_dir, torch.float32, CPU, load_format="dummy", seed=7)
    b, _ = load_model(model_dir, torch.float32, CPU, load_format="dummy", seed=7)
    c, _ = load_model(model_dir, torch.float32, CPU, load_format="dummy", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    embed = sa["model.embed_tokens.weight"]
    assert not torch.equal(embed, sc["model.embed_tokens.weight"])
    assert abs(embed.std().item() - cfg.initializer_range) < 0.01
    assert torch.equal(sa["model.layers.0.self_attn.k_norm.weight"], torch.ones(32))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_demo_checkpoint_is_deterministic(tmp_path, demo_checkpoint_dir):
    other = ensure_demo_checkpoint(str(tmp_path))
    assert other != demo_checkpoint_dir and other.endswith(f"demo-{DEMO_VERSION}")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(os.path.join(other, name)) == _digest(os.path.join(demo_checkpoint_dir, name)), name
    assert ensure_demo_checkpoint(str(tmp_path)) == other  # second call reuses it


def test_demo_checkpoint_concurrent_creation(tmp_path):
    results, errors = [], []

    def create() -> None:
        try:
            results.append(ensure_demo_checkpoint(str(tmp_path)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert os.listdir(tmp_path) == [f"demo-{DEMO_VERSION}"]  # no temporary directories left
    load_model(results[0], torch.float32, CPU)


def test_demo_checkpoint_loads_in_transformers_and_ours(demo_checkpoint_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint_dir)
    hf = AutoModelForCausalLM.from_pretrained(demo_checkpoint_dir, dtype=torch.float32)
    model, hf_config = load_model(demo_checkpoint_dir, torch.float32, CPU)
    assert hf_config.vocab_size == len(tokenizer)
    _assert_weights_equal(model, hf.state_dict())
    info = model_info(hf_config, demo_checkpoint_dir)
    assert info.eos_token_ids == (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>"))

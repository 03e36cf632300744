"""The built-in demo checkpoint: a tiny random-weight Llama with a locally trained tokenizer.

It lets splitserve serve, test and demo end to end with no model hub. Everything is derived
from fixed seeds and a sorted, bounded slice of the Python standard library's source, so the
same Python and library versions always produce byte-identical files:

    <cache>/demo-v2/config.json, generation_config.json, model.safetensors,
                    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...

Several processes may call `ensure_demo_checkpoint` at once: each builds in its own temporary
directory and renames it into place; the first rename wins and the others use its result.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "splitserve-demo"
DEMO_VERSION = "v2"  # v2: the chat template renders tools

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
END_OF_TURN_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, END_OF_TURN_TOKEN, *ROLE_TOKENS)

# One line per turn: <|role|>\ncontent<|end|>\n ; a generation prompt opens the assistant turn.
# (Hugging Face renders templates with trim_blocks: a newline right after a tag is written as {{ '\n' }}.)
# With tools (Hermes/Qwen style): the system turn lists them as JSON inside <tools></tools> and
# asks for <tool_call>{"name": ..., "arguments": ...}</tool_call>; an assistant's calls are written
# that way, and each tool result is a user turn holding <tool_response>...</tool_response>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|end|>\n'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": {{ call["function"]["name"] | tojson }}, '
    '"arguments": {{ call["function"]["arguments"] | tojson }}}\n</tool_call>'
    "{% endfor %}<|end|>\n"
    "{% elif message['role'] == 'tool' %}<|user|>\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|end|>\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

VOCAB_SIZE = 4096
_TRAINING_TEXT_CHARS = 1_500_000  # bounded so training stays well under a second
_WEIGHT_SEED = 1234

MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    # Larger than a real model's 0.02: with random weights this keeps the logits peaked enough
    # that greedy decoding wanders through many tokens instead of repeating one.
    initializer_range=0.25,
)
ROPE_THETA = 10000.0


def default_cache_root() -> str:
    return os.environ.get("SPLITSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "splitserve")


def resolve_model_dir(model: str | None) -> str:
    """`model` as given, or the demo checkpoint (built first if needed) when none is named."""
    return ensure_demo_checkpoint() if model is None else model


def ensure_demo_checkpoint(cache_dir: str | None = None) -> str:
    """Return the demo checkpoint directory under `cache_dir` (default: `default_cache_root()`),
    creating it first if needed."""
    root = Path(cache_dir or default_cache_root())
    final_dir = root / f"demo-{DEMO_VERSION}"
    if (final_dir / "config.json").is_file():
        return str(final_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".demo-{DEMO_VERSION}-building-", dir=root))
    try:
        write_demo_checkpoint(str(tmp_dir))
        try:
            os.rename(tmp_dir, final_dir)  # atomic; fails if another process got there first
        except OSError:
            if not (final_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(final_dir)


def write_demo_checkpoint(out_dir: str) -> None:
    """Write the demo tokenizer, config and weights into `out_dir` (which must exist)."""
    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(out_dir)
    config = _demo_config(tokenizer)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)
    _write_random_weights(config, os.path.join(out_dir, "model.safetensors"))


def build_demo_tokenizer():
    """Byte-level BPE trained on the standard library's top-level .py files (sorted, bounded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[END_OF_TURN_TOKEN, *ROLE_TOKENS],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def _training_texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, num_chars = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        num_chars += len(text)
        if num_chars >= _TRAINING_TEXT_CHARS:
            break
    if not texts:
        raise RuntimeError(f"no .py files found in the standard library at {stdlib} to train the demo tokenizer")
    return texts


def _demo_config(tokenizer) -> dict:
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": MODEL_SHAPE["hidden_size"] // MODEL_SHAPE["num_attention_heads"],
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "torch_dtype": "float32",
        **MODEL_SHAPE,
    }


def _write_random_weights(config: dict, path: str) -> None:
    """Hugging Face Llama tensor names; normal(0, initializer_range) matrices, unit norms."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(_WEIGHT_SEED)
    std = config["initializer_range"]
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    save_file(tensors, path, metadata={"format": "pt"})


def served_model_name(model: str | None) -> str:
    """The name clients use for a model: the demo's fixed name, else `--model` as given (as vLLM
    serves `vllm serve PATH` under PATH, so clients that pass the same PATH find it)."""
    if model is None:
        return DEMO_MODEL_NAME
    return model

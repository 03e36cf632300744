"""Small real tokenizers with chat templates, for the chat prompt cache's tests and probe.

    demo_tokenizer()       the demo checkpoint's: byte-level BPE, <|role|> turns (shared/demo.py)
    qwen_style_tokenizer() byte-level BPE behind a Qwen2-style split regex and NFC, ChatML turns
                           (<|im_start|> / <|im_end|> special), <tool_call> as a plain added token,
                           and a Hermes-style tools block in the system turn
    metaspace_tokenizer()  SentencePiece-style: a Metaspace pre-tokenizer with prepend_scheme "first"
                           (only the text's first segment gets a leading "▁")
    prepend_normalizer_tokenizer()  Llama-2 style: a Prepend("▁") normalizer, no pre-tokenizer
    stripping_tokenizer()  the Qwen-style one with <|im_end|> lstrip + rstrip

Each of the others is trained in well under a second on the standard library's .py files.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

from checkpoints import demo_tokenizer  # noqa: F401  (the demo checkpoint's, trained once per process)

_TRAINING_CHARS = 400_000
_VOCAB_SIZE = 2048

# Written for these tests after the ChatML layout; renders tools, tool calls and tool results.
QWEN_STYLE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nFunction signatures, one JSON object a line, inside <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "Answer a call as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if not tools %}<|im_start|>system\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": {{ call['function']['arguments'] }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's split: contractions, letters with one leading non-letter, single digits, punctuation runs, newlines.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _texts() -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= _TRAINING_CHARS:
            break
    return texts


@functools.cache
def qwen_style_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_texts(), trainer)
    bpe.add_tokens([AddedToken(t, normalized=False, special=False) for t in
                    ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=QWEN_STYLE_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


@functools.cache
def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
                                  show_progress=False)
    sp.train_from_iterator(_texts(), trainer)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}" \
               "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"], chat_template=template)


@functools.cache
def prepend_normalizer_tokenizer():
    """Llama-2 style without a pre-tokenizer: the normalizer prepends "\u2581" and turns spaces into it
    (normalizers run on each segment between split tokens, so every segment starts with one)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=["<s>", "</s>", "[INST]", "[/INST]"],
                                  show_progress=False, max_token_length=16)
    lines = [line for text in _texts()[:2] for line in text.splitlines()]  # no pre-tokenizer splits the texts
    sp.train_from_iterator(lines, trainer)
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}</s>"
                "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["[INST]", "[/INST]"], chat_template=template)


@functools.cache
def stripping_tokenizer():
    """The Qwen-style tokenizer with <|im_end|> stripping the whitespace on both its sides (lstrip, rstrip)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    config = json.loads(qwen_style_tokenizer().backend_tokenizer.to_str())
    for token in config["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token.update(lstrip=True, rstrip=True)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(config)), eos_token="<|im_end|>",
                                   chat_template=QWEN_STYLE_TEMPLATE, clean_up_tokenization_spaces=False)

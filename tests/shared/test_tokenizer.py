"""Tokenizer utilities on the demo tokenizer: chat template, incremental detokenization
(multi-byte characters split across tokens) and stop strings spanning token boundaries."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from splitserve.shared.tokenizer import (
    IncrementalDetokenizer,
    TokenizerLoadError,
    apply_chat_template,
    load_tokenizer,
)

TEXTS = [
    "def main():\n    return {'a': [1, 2, 3]}  # done\n",
    "Grüße aus Köln — 東京 🙂🚀 naïve café",
    "  leading spaces and trailing  ",
    "emoji only: 👩‍👩‍👧‍👦👍🏽",
]


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint_dir):
    return load_tokenizer(demo_checkpoint_dir)


def _stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int]) -> list[str]:
    deltas, i = [], 0
    for size in chunk_sizes:
        deltas.append(detok.add(token_ids[i : i + size]))
        i += size
    deltas.append(detok.add(token_ids[i:]))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_decode_equals_full_decode(tokenizer, text, seed):
    prompt = tokenizer.encode("prompt: ", add_special_tokens=False)
    token_ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    rng = random.Random(seed)
    chunk_sizes = [rng.choice([1, 1, 1, 2, 3]) for _ in range(len(token_ids))]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = _stream(detok, token_ids, chunk_sizes)
    deltas.append(detok.finish())
    assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas), "a replacement char was emitted for a split character"
    assert detok.stopped is None and detok.text == text


def test_multibyte_characters_really_span_tokens(tokenizer):
    """Guards the test above: the demo tokenizer splits these characters over several tokens."""
    token_ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(token_ids) > 1 and "\ufffd" in tokenizer.decode(token_ids[:1])


def test_special_tokens_kept_when_asked(tokenizer):
    token_ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(detok.add([t]) for t in token_ids) + detok.finish() == "hi" + tokenizer.eos_token


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer, include):
    text = "x = compute(value)\nreturn result_value + 1\n"
    stop = "result_val"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([t]) for t in token_ids]
    assert all(stop not in piece for piece in pieces), "the stop string must span several tokens"
    detok = IncrementalDetokenizer(tokenizer, [], stop=["never", stop], include_stop_str_in_output=include)
    deltas = []
    for t in token_ids:
        deltas.append(detok.add([t]))
        if detok.stopped:
            break
    assert detok.stopped == stop
    expected = text[: text.index(stop) + (len(stop) if include else 0)]
    assert "".join(deltas) == detok.text == expected
    assert detok.add(token_ids[-2:]) == "" and detok.finish() == ""


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP here"])
    first = detok.add(tokenizer.encode("go ST", add_special_tokens=False))
    assert first == "go " and detok.stopped is None
    # The continuation rules the stop string out: the held text comes out.
    second = detok.add(tokenizer.encode("ORE", add_special_tokens=False))
    assert second == "STORE"
    third = detok.add(tokenizer.encode(" STOP", add_special_tokens=False))
    assert third == " " and detok.finish() == "STOP"  # generation ended for another reason
    assert detok.text == "go STORE STOP"


def test_earliest_stop_string_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world", "lo w"])
    out = detok.add(tokenizer.encode("hello world", add_special_tokens=False))
    assert (out, detok.stopped) == ("hel", "lo w")


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    token_ids = apply_chat_template(tokenizer, messages)
    assert token_ids[0] == tokenizer.bos_token_id and token_ids.count(tokenizer.bos_token_id) == 1
    expected = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(token_ids, skip_special_tokens=False) == expected
    without_prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert tokenizer.decode(without_prompt, skip_special_tokens=False) == expected[: -len("<|assistant|>\n")]


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerLoadError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_module_imports_no_torch():
    code = "import sys, splitserve.shared.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_demo_tokenizer_loads_without_torch(demo_checkpoint_dir):
    """The gateway tokenizes; with a generic fast tokenizer it must not drag torch into its process."""
    import subprocess
    import sys

    code = ("import sys; from splitserve.shared.tokenizer import load_tokenizer, apply_chat_template; "
            f"t = load_tokenizer({demo_checkpoint_dir!r}); "
            "assert t.encode('hello') and apply_chat_template(t, [{'role': 'user', 'content': 'hi'}]); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_backend_decoder_decodes_as_the_tokenizer_does(tokenizer):
    """The detokenizer's shortcut to the Rust decode gives the transformers wrapper's text on random
    id sequences, special tokens included, with and without skipping them."""
    from splitserve.shared.tokenizer import backend_decoder

    decode = backend_decoder(tokenizer)
    assert decode is not None, "the test tokenizer is a fast tokenizer: the shortcut should apply"
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert decode(ids, skip_special_tokens=skip) == tokenizer.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

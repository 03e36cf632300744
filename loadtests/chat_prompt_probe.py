"""Where a keyed chat turn's gateway milliseconds go: the chat template's render, the tokenization
of the rendered text, and the same turn through the session's chat prompt cache (CPU only).

    python loadtests/chat_prompt_probe.py                        # 1k/3k/5k tokens of history
    python loadtests/chat_prompt_probe.py --history-lens 1000 5000 --repeats 20

For each tokenizer (the demo checkpoint's; a byte-level BPE with a Qwen-style ChatML template and
tools, tests/services/chat_tokenizers.py) and each history length, a conversation of alternating
user and assistant turns (a tool call and its result every fourth turn) is grown to that many
tokens, and the next turn (one new user message, ~60 tokens) is timed as the gateway runs it:

    render    apply_chat_template(..., tokenize=False) of the whole conversation
    tokenize  tokenizer.encode(text) of the whole rendered text (the full path)
    cached    ChatPromptCache.encode of the same text after the previous turn was cached
              (the common prefix found, only the tail tokenized); its ids are checked equal
    miss      ChatPromptCache.encode of the same text under a key it has not seen (a session's
              first turn: the full tokenization plus noting the split tokens and keeping the entry)

The parts are interleaved within each repeat; medians over --repeats; a table prints.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "services"))

from chat_tokenizers import demo_tokenizer, qwen_style_tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository.",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]


def words(rng: random.Random, n: int) -> str:
    vocab = ("the", "request", "worker", "cache", "token", "session", "prefill", "decode", "block", "returns",
             "a", "of", "to", "in", "is", "and", "42", "(x)", "def", "self.", "value,", "error:", "\n")
    return " ".join(rng.choice(vocab) for _ in range(n))


def next_messages(rng: random.Random, turn: int) -> list[dict]:
    """One exchange: a user message and the assistant's answer (every fourth: a tool call and its result)."""
    user = {"role": "user", "content": words(rng, 40)}
    if turn % 4 == 3:
        call = {"id": f"call_{turn}", "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "src/%d.py"}' % turn}}
        return [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{turn}", "content": words(rng, 80)},
                {"role": "assistant", "content": words(rng, 30)}]
    return [user, {"role": "assistant", "content": words(rng, 60)}]


def conversation(tokenizer, num_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are a coding agent."}]
    turn = 0
    while len(render_ids(tokenizer, messages)) < num_tokens:
        messages += next_messages(rng, turn)
        turn += 1
    return messages


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def render_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(render(tokenizer, messages), add_special_tokens=False)


def elapsed_s(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def probe(tokenizer, history_len: int, repeats: int) -> dict:
    """The parts, interleaved within each repeat (the machine's noise falls on all alike); medians in ms."""
    from splitserve.services.gateway.chat_prompt_cache import ChatPromptCache

    history = conversation(tokenizer, history_len, seed=history_len)
    turn = history + [{"role": "user", "content": words(random.Random(1), 40)}]
    previous, text = render(tokenizer, history), render(tokenizer, turn)
    full_ids = tokenizer.encode(text, add_special_tokens=False)
    cache = ChatPromptCache.for_tokenizer(tokenizer)
    times = {"render": [], "tokenize": [], "cached": [], "miss": []}
    for repeat in range(repeats):
        times["render"].append(elapsed_s(lambda: render(tokenizer, turn))[0])
        times["tokenize"].append(elapsed_s(lambda: tokenizer.encode(text, add_special_tokens=False))[0])
        times["miss"].append(elapsed_s(lambda: cache.encode(f"first-{repeat}", text))[0])
        cache.encode("probe", previous)  # the previous turn, as it was cached
        seconds, ids = elapsed_s(lambda: cache.encode("probe", text))
        assert ids == full_ids, "the cached path's token ids differ from the full path's"
        times["cached"].append(seconds)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {"tokens": len(full_ids), "chars": len(text), **medians, "enabled": cache.enabled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history-lens", type=int, nargs="+", default=[1000, 3000, 5000])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"{'tokenizer':<12} {'tokens':>7} {'chars':>7} {'render ms':>10} {'tokenize ms':>12} "
          f"{'full ms':>8} {'cached tok ms':>14} {'turn ms':>8} {'miss ms':>8}")
    for name, build in (("demo", demo_tokenizer), ("qwen-style", qwen_style_tokenizer)):
        tokenizer = build()
        for history_len in args.history_lens:
            r = probe(tokenizer, history_len, args.repeats)
            print(f"{name:<12} {r['tokens']:>7} {r['chars']:>7} {r['render']:>10.2f} {r['tokenize']:>12.2f} "
                  f"{r['render'] + r['tokenize']:>8.2f} {r['cached']:>14.2f} {r['render'] + r['cached']:>8.2f} {r['miss']:>8.2f}"
                  + ("" if r["enabled"] else "  (cache off: split rule fails)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

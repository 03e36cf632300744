"""The cost of structured outputs: one engine, the same requests with and without a JSON schema.

    python loadtests/bench_structured.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 128

(`--structured-outputs-threads N`: the bitmask fill's threads; loadtests/bench_bitmask_fill.py
times the fill alone per thread count.)

Random weights of a real shape (`--load-format dummy`) and a byte-level tokenizer of the shape's
vocabulary size written beside them (words of the standard library's source, so xgrammar's token
masks are as large and as varied as a real tokenizer's). The schema (an object holding an array
of at least `output_len` strings) cannot be complete before `output_len` tokens, so both runs
produce exactly the same number of tokens. Prints wall time, output tok/s and the median decode
step of each run, and the throughput loss against the 5 % target. `--shape tiny --device cpu`
runs the same code on a CPU in seconds (tests/loadtests/test_bench_structured.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_offline import _time_steps  # noqa: E402
from phase_probe import PhaseProbe  # noqa: E402
from results import add_result_json_arg, write_result_json  # noqa: E402
from shapes import SHAPES, write_shape  # noqa: E402
from workload import add_engine_args, add_shape_arg, add_workload_args, random_prompts  # noqa: E402

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=1, torch_dtype="float32", hidden_act="silu", initializer_range=0.02)
TARGET_LOSS = 0.05


def schema(output_len: int) -> dict:
    """Never complete within output_len tokens: every array item takes at least one token."""
    return {"type": "object", "additionalProperties": False, "required": ["items"],
            "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": output_len}}}


def write_model(shape: str, out_dir: str) -> tuple[str, int]:
    if shape == "tiny":
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(TINY, f)
        vocab_size = TINY["vocab_size"]
    else:
        write_shape(shape, out_dir)
        vocab_size = SHAPES[shape]["vocab_size"]
    write_tokenizer(out_dir, vocab_size - min(256, vocab_size // 16))  # room for special ids, as Llama 3 has
    return out_dir, vocab_size


def write_tokenizer(out_dir: str, num_tokens: int) -> None:
    """A byte-level BPE vocabulary of `num_tokens` entries: the 256 bytes, then the most frequent
    words, numbers and punctuation runs of the standard library's source (synthetic ones if it
    runs out). Only the vocabulary matters here: prompts are token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_unicode = _byte_to_unicode()
    vocab = {"<s>": 0, "</s>": 1}
    for b in range(256):
        vocab.setdefault(to_unicode[b], len(vocab))
    for word in _frequent_words(num_tokens):
        if len(vocab) >= num_tokens:
            break
        vocab.setdefault("".join(to_unicode[b] for b in word.encode()), len(vocab))
    while len(vocab) < num_tokens:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(out_dir)


def _frequent_words(count: int) -> list[str]:
    counts: dict[str, int] = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        for word in re.findall(r" ?[A-Za-z_]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]{1,3}|\s+",
                               path.read_text(encoding="utf-8", errors="replace")):
            counts[word] = counts.get(word, 0) + 1
        if len(counts) >= 2 * count:
            break
    return sorted(counts, key=lambda w: -counts[w])


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b], extra = chr(256 + extra), extra + 1
    return mapping


def run(llm, steps: list, prompts: list[list[int]], output_len: int, structured: bool, probe=None) -> dict:
    """A cold pass (compiles, allocator growth), then the timed one (`probe`: its phases printed)."""
    from splitserve.shared.sampling_params import SamplingParams
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    spec = StructuredOutputsParams(json=schema(output_len)) if structured else None
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, structured_outputs=spec)
    for _ in ("cold", "timed"):
        steps.clear()
        if probe is not None:
            probe.reset()
        _synchronize()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        _synchronize()
        elapsed = time.perf_counter() - start
    if probe is not None:
        print(f"phases, {'json schema' if structured else 'unconstrained'}: {probe.table()}", flush=True)
    lengths = {len(o.outputs[0].token_ids) for o in outs}
    assert lengths == {output_len}, f"output lengths {lengths}, expected {output_len} for every request"
    decode = sorted(t for n, tokens, t in steps if tokens == n)
    return {"workload": "json schema" if structured else "unconstrained", "time_s": elapsed,
            "output_tok_s": len(prompts) * output_len / elapsed, "num_steps": len(steps),
            "median_decode_step_ms": decode[len(decode) // 2] * 1e3 if decode else 0.0,
            "mean_step_ms": sum(t for *_, t in steps) / len(steps) * 1e3}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arg(parser, "llama-3.2-1b", extra=("tiny",))
    add_workload_args(parser, num_prompts=256, input_len=512, output_len=128)
    add_engine_args(parser, max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    parser.add_argument("--structured-outputs-threads", type=int, default=None,
                        help="threads of the bitmask fill (the engine's flag; unset: half the cores, at most 4)")
    parser.add_argument("--structured-outputs-backend", default="xgrammar", choices=("xgrammar", "guidance"),
                        help="the grammar engine (the engine's flag)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--phases", action="store_true",
                        help="print each run's median host and device time per decode step by phase (phase_probe.py)")
    add_result_json_arg(parser)
    args = parser.parse_args(argv)

    from splitserve.shared.grammar_fill import default_threads
    from splitserve.shared.llm import LLM

    model_dir, vocab_size = write_model(args.shape, tempfile.mkdtemp(prefix=f"structured-{args.shape}-"))
    prompts = random_prompts(args.num_prompts, args.input_len, vocab_size, low=300)
    llm = LLM(model_dir, load_format="dummy", device=args.device, skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              structured_outputs_threads=args.structured_outputs_threads,
              structured_outputs_backend=args.structured_outputs_backend)
    steps = _time_steps(llm.engine)
    probe = PhaseProbe(llm.engine) if args.phases else None
    rows = [run(llm, steps, prompts, args.output_len, structured, probe) for structured in (False, True)]
    loss = 1.0 - rows[1]["output_tok_s"] / rows[0]["output_tok_s"]
    step_overhead = rows[1]["median_decode_step_ms"] / max(rows[0]["median_decode_step_ms"], 1e-9) - 1.0
    print(f"\n{args.shape}, {args.num_prompts} requests x ({args.input_len} in -> {args.output_len} out), greedy, "
          f"async scheduling {'on' if llm.engine.async_scheduling else 'off'}, "
          f"{args.structured_outputs_backend}, {args.structured_outputs_threads or default_threads()} bitmask fill threads")
    print(f"{'workload':16s} {'time_s':>8s} {'out tok/s':>10s} {'median decode step ms':>22s} {'mean step ms':>13s}")
    for r in rows:
        print(f"{r['workload']:16s} {r['time_s']:8.3f} {r['output_tok_s']:10.0f} {r['median_decode_step_ms']:22.2f} "
              f"{r['mean_step_ms']:13.2f}")
    verdict = "within" if loss <= TARGET_LOSS else "OVER"
    print(f"throughput loss {loss * 100:.1f} % ({verdict} the {TARGET_LOSS * 100:.0f} % target); "
          f"median decode step +{step_overhead * 100:.1f} %")
    result = {"args": vars(args), "rows": rows, "throughput_loss": loss, "decode_step_overhead": step_overhead}
    write_result_json(args.result_json, result)
    return result


if __name__ == "__main__":
    main()

"""Which side of a parity failure is wrong: our engine on CUDA and CPU against transformers on CUDA
and CPU, with eager and SDPA attention, greedy, fp32, on tiny random checkpoints.

    python loadtests/gpu_reference_probe.py gemma2 gemma3 llama

Each row compares one (engine, device, setting) to transformers' eager attention on CPU, the
reference the CPU parity tests use. Our engine runs twice per device: chunked prefill forced to 24
tokens a step, and whole prompts. A row that differs from the reference alone, while the others
agree, names the side at fault.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402
from splitserve.shared.llm import LLM  # noqa: E402
from splitserve.shared.sampling_params import SamplingParams  # noqa: E402

NEW_TOKENS = 24


def ours(model_dir: str, device: str, prompts: list[list[int]], step_tokens: int) -> list[list[int]]:
    llm = LLM(model_dir, device=device, dtype="float32", num_blocks=256, block_size=16,
              max_num_batched_tokens=step_tokens, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def transformers_greedy(model_dir: str, device: str, prompts: list[list[int]], attention: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attention).to(device).eval()
    outs = [model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return outs


def probe(arch: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"probe-{arch}-"), arch)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 4000) for _ in range(n)] for n in (5, 33, 60)]
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    rows = {}
    for device in devices:
        for step_tokens in (24, 4096):
            rows[f"ours {device} step {step_tokens}"] = ours(model_dir, device, prompts, step_tokens)
        for attention in ("eager", "sdpa"):
            rows[f"transformers {device} {attention}"] = transformers_greedy(model_dir, device, prompts, attention)
    reference = rows["transformers cpu eager"]
    for name, outs in rows.items():
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(outs, reference)]
        same = sum(f is None for f in first)
        print(f"{arch:8s} {name:28s} {same}/{len(prompts)} identical to transformers cpu eager; "
              f"first differing token {first}", flush=True)


if __name__ == "__main__":
    for arch in sys.argv[1:] or ["gemma2"]:
        probe(arch)

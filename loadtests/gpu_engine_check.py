"""GPU correctness of the engine path (Triton kernels, CUDA graphs), run on the lent GPU.

1. fp32 on CUDA: greedy tokens equal transformers' `generate` on tiny random checkpoints of all four
   architectures, logprobs within 1e-3, batched with chunked prefill.
2. bf16: decode through captured CUDA graphs gives the same tokens as eager decode (Llama, and
   Gemma 2, whose KV pool is split by layer group: one block table per group in the graphs).
3. bf16, structured outputs: async scheduling (grammar rows sampled a step late, under bitmasks
   filled on the grammar pool, beside penalised and min_tokens rows) gives the same tokens as
   synchronous steps, and every regex output matches.

    python loadtests/gpu_engine_check.py [ARCH ...]   (all architectures by default; exits non-zero on any mismatch)
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

from checkpoints import ARCHITECTURES, build_checkpoint  # noqa: E402
from splitserve.shared.llm import LLM  # noqa: E402
from splitserve.shared.sampling_params import SamplingParams  # noqa: E402

NEW_TOKENS = 24


def hf_greedy(model_dir: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    # Eager attention: the reference must compute what the checkpoint says. transformers 5.17 (the
    # GPU image's) may dispatch Gemma 2 to SDPA, which has no attention soft-capping; 5.24 refuses
    # SDPA for Gemma 2 and runs eager, which is what the CPU parity tests compare against.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").cuda().eval()
    out = model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]


def check_fp32_parity(arch: str) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"gpu-{arch}-"), arch)
    llm = LLM(model_dir, device="cuda", dtype="float32", num_blocks=256, block_size=16, max_num_batched_tokens=24,
              enforce_eager=True)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 4000) for _ in range(n)] for n in (5, 33, 60)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    problems = []
    eos = llm.tokenizer.eos_token_id
    for prompt, result in zip(prompts, results):
        ref_tokens, ref_lp = hf_greedy(model_dir, prompt)
        if eos in ref_tokens:
            continue  # HF's min_new_tokens masks EOS; ignore_eos does not (see tests/shared/test_parity.py)
        out = result.outputs[0]
        ours_lp = [e[t].logprob for e, t in zip(out.logprobs, out.token_ids)]
        if out.token_ids != ref_tokens:
            problems.append(f"{arch}: tokens differ for prompt len {len(prompt)}")
        elif max(abs(a - b) for a, b in zip(ours_lp, ref_lp)) > 1e-3:
            problems.append(f"{arch}: logprobs differ by {max(abs(a - b) for a, b in zip(ours_lp, ref_lp)):.2e}")
    print(f"fp32 parity {arch}: {'OK' if not problems else problems}", flush=True)
    return problems


def check_graphs_and_async_match_eager(arch: str = "llama") -> list[str]:
    model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"gpu-graphs-{arch}-"), arch)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 4000) for _ in range(rng.randrange(4, 90))] for _ in range(37)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = {}
    for mode in ("eager", "graphs", "graphs+async"):
        llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_blocks=512, block_size=16,
                  enforce_eager=mode == "eager", async_scheduling=mode.endswith("async"), max_num_seqs=64)
        outputs[mode] = [r.outputs[0].token_ids for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        groups = llm.engine.stats().kv_group_blocks
        del llm
    problems = []
    print(f"bf16 {arch}: KV layer groups {groups or 'none (one pool)'}", flush=True)
    for mode in ("graphs", "graphs+async"):
        same = sum(a == b for a, b in zip(outputs["eager"], outputs[mode]))
        print(f"bf16 {arch} {mode} vs eager: {same}/{len(prompts)} requests token-identical", flush=True)
        if same != len(prompts):
            problems.append(f"{arch} {mode} differs from eager on {len(prompts) - same} requests")
    return problems


def check_structured_async_matches_sync(arch: str = "llama") -> list[str]:
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    model_dir = build_checkpoint(tempfile.mkdtemp(prefix=f"gpu-structured-{arch}-"), arch)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 4000) for _ in range(rng.randrange(4, 60))] for _ in range(32)]
    regex = "[a-e]{3,8}-[0-9]{2,5}"
    kinds = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, structured_outputs=StructuredOutputsParams(regex=regex)),
             SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, repetition_penalty=1.3),
             SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, min_tokens=8,
                            structured_outputs=StructuredOutputsParams(json_object=True)),
             SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    outputs = {}
    for mode in ("sync", "async"):
        llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_blocks=512, block_size=16,
                  async_scheduling=mode == "async", max_num_seqs=64)
        outputs[mode] = [r.outputs[0] for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        llm.close()
        del llm
    problems = [f"structured {arch}: request {i} differs between sync and async"
                for i, (a, b) in enumerate(zip(outputs["sync"], outputs["async"])) if a.token_ids != b.token_ids]
    import re
    problems += [f"structured {arch}: request {i} does not match its regex: {o.text!r}"
                 for i, o in enumerate(outputs["async"]) if i % len(kinds) == 0 and o.finish_reason == "stop"
                 and not re.fullmatch(regex, o.text)]
    print(f"structured async vs sync {arch}: {'OK' if not problems else problems}", flush=True)
    return problems


def main(archs: list[str]) -> int:
    problems = []
    for arch in archs or ARCHITECTURES:
        problems += check_fp32_parity(arch)
    problems += check_graphs_and_async_match_eager("llama")
    problems += check_graphs_and_async_match_eager("gemma2")  # pool split by KV layer group
    problems += check_structured_async_matches_sync("llama")
    print("GPU ENGINE CHECK:", "PASS" if not problems else f"FAIL {problems}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

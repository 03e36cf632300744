"""KV memory of an interleaved sliding-window model whose pool is split by layer group, on the GPU:
how many full-attention blocks the same KV memory gives split vs as one pool, and that as many
long requests as the split holds (more than one pool would) run at once without preemption.

    python loadtests/kv_layer_groups.py                  (Gemma 2 9B shape, random weights, bf16, one GPU)
    python loadtests/kv_layer_groups.py --tiny --device cpu      (a tiny shape: the CPU smoke run of the test)

The sliding group is sized for `max_num_seqs` requests, so the saving needs `max_num_seqs` below
about (KV memory / layers) / (window / block_size); the default 48 suits the 9B shape on an H200.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

GEMMA2_9B = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=3584, intermediate_size=14336,
                 num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                 max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
                 hidden_activation="gelu_pytorch_tanh", layer_types=["sliding_attention", "full_attention"] * 21,
                 tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, torch_dtype="bfloat16")
TINY = dict(GEMMA2_9B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=512, sliding_window=8,
            query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"], torch_dtype="float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Gemma 2 shape and a 48-block pool (CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 48 (9B shape), 4 (tiny)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens per request; default 8000 / 44")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 / 8")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams

    tiny = args.tiny
    seqs = args.max_num_seqs or (4 if tiny else 48)
    context, new = args.context or (44 if tiny else 8000), args.new_tokens or (8 if tiny else 64)
    model_dir = tempfile.mkdtemp(prefix="kv-layer-groups-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(TINY if tiny else GEMMA2_9B, f)
    pool = dict(num_blocks=48, block_size=4, max_num_batched_tokens=32) if tiny else dict(
        gpu_memory_utilization=args.gpu_memory_utilization)
    llm = LLM(model_dir, device=args.device, load_format="dummy", dtype="float32" if tiny else "bfloat16",
              skip_tokenizer_init=True, max_num_seqs=seqs, enable_prefix_caching=False, **pool)
    engine = llm.engine
    groups = engine.runner.model.kv_layer_groups()
    blocks = [g.pool.num_blocks for g in engine.kv.groups]
    one_pool = sum(n * len(layers) for n, (_, layers) in zip(blocks, groups)) // sum(len(l) for _, l in groups)
    per_request = -(-(context + new) // engine.block_size)
    num_requests = min(seqs, blocks[0] // per_request)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(context)]} for _ in range(num_requests)]
    start = time.perf_counter()
    llm.generate(prompts, params)
    return dict(kv_group_blocks=engine.stats().kv_group_blocks, one_pool_blocks=one_pool, block_size=engine.block_size,
                requests=num_requests, tokens_per_request=context + new,
                blocks_at_once=num_requests * per_request, beyond_one_pool=num_requests * per_request > one_pool,
                preemptions=engine.scheduler.num_preemptions, wall_s=round(time.perf_counter() - start, 2))


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)
    return 0 if result["beyond_one_pool"] and result["preemptions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

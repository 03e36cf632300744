#!/usr/bin/env bash
# Every GPU check and benchmark of docs/benchmarks.md in one go, each output in its own file.
#
#   bash loadtests/gpu_suite.sh [STEP ...]      (default: all steps, in this order)
#
# Steps: check (engine parity, graphs and async vs eager), kernels, tune, offline (1B vs transformers
# vs roofline), offline8b (a smaller 8B workload, with the transformers peer), step8b, profile,
# serve (whole stack, colocated vs disaggregated), served (the engine alone against the served stack,
# colocated and disaggregated on one GPU, alternating, CPU of every process), transfer (two GPU
# processes over UCX). Not in the default list: calls (the engine's Python calls per request per
# decode step on the 1B workload, loadtests/engine_calls_per_token.py), moe (the fused-MoE tile
# sweep into $OUT/moe_table.json, to commit as kernels/moe_configs/<GPU name>.json, and the
# kernel launches of one Qwen3-MoE layer).
# Two-GPU steps, not in the default list: tp2 (tensor parallelism over NCCL: TP=2 tokens == TP=1,
# CUDA graphs with all-reduces == eager, TP=1 vs TP=2 decode tokens/s), transfer2 (GPU 0 -> GPU 1
# over UCX, then NCCL, GB/s against the measured device-to-device copy), pdtp2 (P/D at different
# TP sizes: prefill TP=2 -> decode TP=1 and the reverse, tokens == TP=1, whole-head KV moved) and serve2 (prefill on GPU 0 + decode on GPU 1 against two
# colocated workers, one per GPU, at rising rates with long prompts; UCX, then NCCL).
# Outputs go to $OUT (default ./gpu-results): STEP.txt, plus JSON where the tool writes it. The
# summary lines of each step are printed as it ends. splitserve must be importable (installed, or
# on PYTHONPATH). Steps run from /tmp so a checkout's folders cannot shadow the installed package.
# STEP_TIMEOUT (seconds, default 900) ends a step that runs longer; its file keeps what it printed.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(check kernels tune offline offline8b step8b profile serve served transfer)
export PYTHONUNBUFFERED=1
L="$REPO/loadtests"

run() {  # run STEP CMD...: output to $OUT/STEP.txt, then its summary lines
    local step=$1; shift
    local start=$SECONDS
    (cd /tmp && timeout "${STEP_TIMEOUT:-900}" "$@") > "$OUT/$step.txt" 2>&1
    local rc=$?
    echo "== $step: exit $rc, $((SECONDS - start)) s"
    grep -v -i warn "$OUT/$step.txt" | grep -E "$SUMMARY" | tail -n 40
}

for step in "${STEPS[@]}"; do
    case $step in
        check) SUMMARY="parity|vs eager|CHECK"; run check python "$L/gpu_engine_check.py" ;;
        kernels) SUMMARY="failure|rel_err|paged_attn decode  |prefill chunk  "; run kernels python "$L/gpu_kernels.py" ;;
        tune) SUMMARY="^==|^\(|default"; run tune python "$L/tune_attention.py" ;;
        offline) SUMMARY="^(roofline|splitserve|transformers|system|cold|timed)"
                 run offline python "$L/bench_offline.py" --result-json "$OUT/offline.json" ;;
        offline8b) SUMMARY="^(roofline|splitserve|transformers|system|peer)"
                   run offline8b python "$L/bench_offline.py" --shape llama-3.1-8b --num-prompts 32 --input-len 512 \
                       --output-len 32 --scheduling async --result-json "$OUT/offline8b.json" ;;
        step8b) SUMMARY="^ *[0-9]+ |batch|prefill:"
                run step8b python "$L/bench_step.py" --shape llama-3.1-8b --batches 1,32,128,256 --context 1024 --async-scheduling ;;
        profile) SUMMARY="decode phases|async decode|CUDA time total"
                 run profile python "$L/profile_step.py" --shape llama-3.2-1b --batch 256 --context 512 ;;
        serve) SUMMARY="^(topology|colocated|disaggregated|-)|requests x"
               run serve python "$L/serve_compare.py" --shape llama-3.2-1b --rates 8,inf --num-prompts 100 --input-len 1024 \
                   --output-len 128 --gpu-memory-utilization 0.4 --ucx-tls tcp,cuda_copy,cuda_ipc --goodput tpot:20 \
                   --out-dir "$OUT/serve" ;;
        served) SUMMARY="^ *[0-9]+ (engine alone|colocated|disaggregated)|->|requests x|^  round"
                run served python "$L/engine_vs_served.py" --shape llama-3.2-1b --num-prompts 256 --input-len 512 \
                    --output-len 128 --rounds 2 --max-num-seqs 256 --max-num-batched-tokens 16384 \
                    --gpu-memory-utilization 0.4 --ucx-tls tcp,cuda_copy,cuda_ipc --out-dir "$OUT/served" ;;
        calls) SUMMARY="^(sync|async|scheduling) "
               run calls python "$L/engine_calls_per_token.py" --device cuda --shape llama-3.2-1b --num-prompts 256 \
                   --input-len 512 --output-len 128 ;;
        transfer) SUMMARY="GB/s|bit-exact|blocks"; run transfer python "$L/gpu_transfer.py" --blocks 256 ;;
        moe) SUMMARY="^==|^ +[0-9]+ +[0-9]+ |WRONG|launches per|routing softmax|wrote|budget"
             run moe bash -c "python '$L/tune_moe.py' --out '$OUT/moe_table.json' && \
                 python '$L/moe_launches.py' --shape qwen3-30b-a3b --tokens 1,64,256" ;;
        transfer2) SUMMARY="GB/s|bit-exact|blocks|peak"
                   run transfer2 bash -c "python '$L/gpu_transfer.py' --blocks 256 --decode-device cuda:1 && \
                       python '$L/gpu_transfer.py' --blocks 256 --decode-device cuda:1 --backend nccl" ;;
        serve2) SUMMARY="^(topology|colocated|disaggregated|-)|requests x"
                run serve2 bash -c "python '$L/serve_compare.py' --shape llama-3.1-8b --colocated-workers 2 --rates 4,8,16,inf \
                    --num-prompts 100 --input-len 4096 --output-len 256 --gpu-memory-utilization 0.9 \
                    --ucx-tls cuda_copy,cuda_ipc,tcp --goodput tpot:25 --out-dir '$OUT/serve2-ucx' && \
                    python '$L/serve_compare.py' --shape llama-3.1-8b --topologies disaggregated --transfer-backend nccl \
                    --rates 4,8,16,inf --num-prompts 100 --input-len 4096 --output-len 256 --gpu-memory-utilization 0.9 \
                    --goodput tpot:25 --out-dir '$OUT/serve2-nccl'" ;;
        tp2) SUMMARY="checked|TP=|passed|differ"; run tp2 python "$L/gpu_tensor_parallel.py" ;;
        pdtp2) SUMMARY="TP=|passed|differ|FAILED"; run pdtp2 python "$L/gpu_pd_tensor_parallel.py" ;;
        *) echo "unknown step $step (steps: check kernels tune offline offline8b step8b profile serve served transfer calls moe;" \
                "two GPUs: transfer2 serve2 tp2 pdtp2)"; exit 2 ;;
    esac
done

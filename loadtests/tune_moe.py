"""Sweep the fused MoE kernels' tiles per shape and token count; write the best as the kernel's table.

For each MoE shape (experts, top-k, hidden, expert intermediate) and token count, under a uniform
random routing (what random weights give): for each candidate `block_m` the pairs are aligned once,
then each GEMM's tiles (`block_n, block_k, group_m, num_warps, num_stages`) are swept on their own,
every candidate's output checked against a plain-torch fp32 reference of that GEMM (relative error
< 1e-2, outputs NaN-filled first so a tile that writes nothing fails) and timed from a CUDA graph of
repeated launches. The config is the `block_m` whose align + gate/up + down time is least, with
each GEMM's best tiles. It is then checked and timed end to end (`fused_moe` against
`fused_moe_ref`) beside the heuristic the kernel falls back to. Printed per token count: the config,
µs, the heuristic's µs, GB/s of the expert weights this routing touches, % of a device copy's
bandwidth measured in the same run, TFLOP/s.

    python loadtests/tune_moe.py --out gpu-results     # -> gpu-results/NVIDIA_H200.json on an H200
    # then commit it as kernels/moe_configs/NVIDIA_H200.json (the name the kernel looks for)

The grid is pruned (shared memory, accumulator size, `group_m` only where an expert has several
row tiles) and compiled ahead in `--jobs` processes (`tune_moe_compile.py`), all shapes submitted
at once, so compiling overlaps the sweep. `--budget-s` stops starting new cases once spent; what finished is written. An
existing `--out` file is merged into (its other entries kept). On CPU (TRITON_INTERPRET=1, the
test) it runs the same path with wall-clock timing and no compile workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from shapes import SHAPES, moe_experts  # noqa: E402
from tune_moe_compile import submit_compiles, wait_for_compiles  # noqa: E402
from splitserve.kernels.fused_moe import down_rows, fused_moe, fused_moe_ref, gate_up_rows  # noqa: E402
from splitserve.kernels.moe_align import align_pairs_by_expert  # noqa: E402
from splitserve.kernels.moe_config import MoeLaunchConfig, MoeTile, device_name, heuristic_config  # noqa: E402
from splitserve.kernels.moe_config import shape_key, table_file_name  # noqa: E402

DEFAULT_SHAPES = "qwen3-30b-a3b,mixtral-8x7b,qwen1.5-moe-a2.7b"
DEFAULT_TOKENS = "1,16,64,128,256,512,2048,8192"
REL_ERR_BOUND = 1e-2
SMEM_BYTES = 200 * 1024  # below the H100/H200 227 KiB a block may use, leaving the compiler room
GRAPH_TARGET_US = 2000.0  # launches per timing graph: about this long


@dataclass(frozen=True)
class MoeShape:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int  # per rank

    @staticmethod
    def parse(spec: str, tp: int) -> MoeShape:
        """A name from loadtests/shapes.py, or `E,k,H,I` (the CPU test's tiny shape)."""
        if spec in SHAPES:
            num_experts, top_k, inter = moe_experts(spec)
            if not num_experts:
                raise SystemExit(f"{spec} is not a mixture-of-experts shape")
            return MoeShape(spec, num_experts, top_k, SHAPES[spec]["hidden_size"], inter // tp)
        num_experts, top_k, hidden, inter = (int(v) for v in spec.split(","))
        return MoeShape(spec, num_experts, top_k, hidden, inter // tp)


def parse_shapes(text: str, tp: int) -> list[MoeShape]:
    """'qwen3-30b-a3b,mixtral-8x7b' (names, comma-separated), or dims 'E,k,H,I'; ';' between groups."""
    specs = []
    for part in re.split(r"[;\s]+", text.strip()):
        specs += [part] if re.fullmatch(r"\d+(,\d+){3}", part) else [p for p in part.split(",") if p]
    return [MoeShape.parse(spec, tp) for spec in specs]


# ---------------------------------------------------------------- the grid


def block_m_candidates(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 8:
        return [16]
    if rows_per_expert <= 32:
        return [16, 32]
    if rows_per_expert <= 128:
        return [32, 64]
    return [64, 128]


def tile_candidates(kind: str, block_m: int, rows_per_expert: float, small: bool) -> list[MoeTile]:
    """Tiles of one GEMM (`kind` "gate_up": two weight tiles and two accumulators, or "down")."""
    if small:
        return [MoeTile(32, 32, 0, 4, 1), MoeTile(16, 16, 2, 4, 1)]
    weight_tiles = 2 if kind == "gate_up" else 1
    groups = (0, 8) if rows_per_expert > 2 * block_m else (0,)
    # few rows per tile stream weights (deeper pipelines pay); many rows are compute-bound
    stage_counts, block_ns = ((3, 4, 5), (32, 64, 128, 256)) if block_m <= 32 else ((2, 3, 4), (64, 128, 256))
    out = []
    for block_n in block_ns:
        if block_m * block_n * weight_tiles > 32768:  # fp32 accumulators past this spill registers
            continue
        for block_k in (64, 128, 256):
            for stages in stage_counts:
                if stages * (block_m + weight_tiles * block_n) * block_k * 2 > SMEM_BYTES:
                    continue
                for warps in (4, 8) if block_m * block_n >= 64 * 128 else (4,):
                    out += [MoeTile(block_n, block_k, group, warps, stages) for group in groups]
    return out


def sweep_plan(shape: MoeShape, tokens: list[int], small: bool) -> dict[int, list[tuple[int, str, MoeTile]]]:
    """token count -> the (block_m, kind, tile) candidates its sweep runs."""
    plan = {}
    for num_tokens in tokens:
        rows = num_tokens * shape.top_k / shape.num_experts
        plan[num_tokens] = [(bm, kind, tile) for bm in block_m_candidates(rows) for kind in ("gate_up", "down")
                            for tile in tile_candidates(kind, bm, rows, small)]
    return plan


# ---------------------------------------------------------------- one case: inputs, references, timing


@dataclass
class Case:
    """One token count's inputs and the fp32 per-pair references of both GEMMs."""

    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor  # [T, k] fp32, renormalised
    ids: torch.Tensor  # [T, k]
    inter_ref: torch.Tensor  # [T*k, I] fp32: act(gate) * up of each pair
    pair_out_ref: torch.Tensor  # [T*k, H] fp32: each pair's down projection times its weight

    @property
    def touched_experts(self) -> int:
        return torch.unique(self.ids).numel()


def make_weights(shape: MoeShape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    w13 = torch.randn(shape.num_experts, 2 * shape.inter, shape.hidden, generator=gen, device=device) * shape.hidden**-0.5
    w2 = torch.randn(shape.num_experts, shape.hidden, shape.inter, generator=gen, device=device) * shape.inter**-0.5
    return w13.to(dtype), w2.to(dtype)


def make_case(shape: MoeShape, num_tokens: int, w13: torch.Tensor, w2: torch.Tensor) -> Case:
    gen = torch.Generator(w13.device).manual_seed(num_tokens)
    x = torch.randn(num_tokens, shape.hidden, generator=gen, device=w13.device).to(w13.dtype)
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen, device=w13.device)
    weights, ids = torch.topk(torch.softmax(logits, -1), shape.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    flat_ids, tokens = ids.reshape(-1), torch.arange(num_tokens * shape.top_k, device=x.device) // shape.top_k
    inter_ref = torch.empty(flat_ids.numel(), shape.inter, device=x.device)
    pair_out_ref = torch.empty(flat_ids.numel(), shape.hidden, device=x.device)
    for expert in torch.unique(flat_ids).tolist():
        pairs = torch.nonzero(flat_ids == expert).squeeze(1)
        gate_up = x[tokens[pairs]].float() @ w13[expert].float().t()
        inter_ref[pairs] = torch.nn.functional.silu(gate_up[:, : shape.inter]) * gate_up[:, shape.inter :]
        pair_out_ref[pairs] = (inter_ref[pairs].to(x.dtype).float() @ w2[expert].float().t()) * weights.reshape(-1)[pairs, None]
    return Case(x, w13, w2, weights, ids, inter_ref, pair_out_ref)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_us(fn, device: torch.device):
    """(kernel time of `fn` in µs, what its first call returned): the median replay of a CUDA graph
    of repeated launches, per launch; on CPU (the interpreter) the wall time of one call."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = fn()
        return (time.perf_counter() - start) * 1e6, result
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    result = fn()
    end.record()
    end.synchronize()
    reps = int(min(100, max(3, GRAPH_TARGET_US / max(begin.elapsed_time(end) * 1e3, 1.0))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    samples = []
    for _ in range(5):
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1e3 / reps)
    return statistics.median(samples), result


# ---------------------------------------------------------------- the sweep of one case


@dataclass
class Tried:
    us: float
    tile: MoeTile


def _sweep_gemm(kind: str, block_m: int, tiles: list[MoeTile], case: Case, aligned, log) -> Tried | None:
    """Check and time each tile of one GEMM at one alignment; the fastest correct one."""
    pair_of_row, expert_of_tile = aligned
    rows = torch.nonzero(pair_of_row >= 0).squeeze(1)
    pairs = pair_of_row[rows].long()
    top_k, inter, hidden = case.ids.shape[1], case.w2.shape[2], case.w2.shape[1]
    inter_rows = torch.empty(pair_of_row.shape[0], inter, dtype=case.x.dtype, device=case.x.device)
    if kind == "gate_up":
        out = inter_rows
        run = lambda t: gate_up_rows(inter_rows, case.x, case.w13, *aligned, top_k, "silu", block_m, t)  # noqa: E731
        check = lambda: rel_err(inter_rows[rows], case.inter_ref[pairs])  # noqa: E731
    else:  # from the reference's gate/up output, so each GEMM is checked on its own
        inter_rows[rows] = case.inter_ref[pairs].to(case.x.dtype)
        out = torch.empty(case.ids.numel(), hidden, dtype=case.x.dtype, device=case.x.device)
        weights = case.weights.reshape(-1).contiguous()
        run = lambda t: down_rows(out, inter_rows, case.w2, weights, *aligned, block_m, t)  # noqa: E731
        check = lambda: rel_err(out, case.pair_out_ref)  # noqa: E731
    best = None
    for tile in tiles:
        try:
            out.fill_(float("nan"))
            us, _ = time_us(lambda: run(tile), case.x.device)  # every run writes the same output
            err = check()
        except Exception as exc:  # noqa: BLE001 - out of resources and the like: skip the tile
            log(f"    {kind} bm={block_m} {tile}: {type(exc).__name__}")
            continue
        if not err <= REL_ERR_BOUND:  # NaN fails too
            print(f"    {kind} bm={block_m} {tile}: WRONG rel err {err:.2e}")
        elif best is None or us < best.us:
            best = Tried(us, tile)
    return best


def sweep_case(case: Case, candidates: list[tuple[int, str, MoeTile]], log) -> MoeLaunchConfig | None:
    """The block_m with the least align + gate/up + down time, each GEMM on its best tiles."""
    num_experts, device = case.w13.shape[0], case.x.device
    best, best_us = None, float("inf")
    for block_m in sorted({bm for bm, _, _ in candidates}):
        aligned = align_pairs_by_expert(case.ids, num_experts, block_m)
        tiles = {kind: [t for bm, k, t in candidates if bm == block_m and k == kind] for kind in ("gate_up", "down")}
        gate_up = _sweep_gemm("gate_up", block_m, tiles["gate_up"], case, aligned, log)
        down = _sweep_gemm("down", block_m, tiles["down"], case, aligned, log)
        if gate_up is None or down is None:
            continue
        total = time_us(lambda: align_pairs_by_expert(case.ids, num_experts, block_m), device)[0] + gate_up.us + down.us
        log(f"    bm={block_m}: gate_up {gate_up.us:.1f} us {gate_up.tile}, down {down.us:.1f} us {down.tile}")
        if total < best_us:
            best, best_us = MoeLaunchConfig(block_m, gate_up.tile, down.tile), total
    return best


def measure(case: Case, config: MoeLaunchConfig, ref: torch.Tensor) -> tuple[float, float]:
    """(µs, rel err) of the whole `fused_moe` at `config`, against `ref` (`fused_moe_ref` in fp32)."""
    args = (case.x, case.w13, case.w2, case.weights, case.ids)
    us, out = time_us(lambda: fused_moe(*args, config=config), case.x.device)
    return us, rel_err(out, ref)


# ---------------------------------------------------------------- report, table, driver


def expert_bytes_flops(shape: MoeShape, num_tokens: int, touched: int, dtype_bytes: int) -> tuple[int, float]:
    """Bytes of the expert weights this routing reads; FLOPs of the routed GEMMs."""
    return touched * 3 * shape.hidden * shape.inter * dtype_bytes, 2.0 * num_tokens * shape.top_k * 3 * shape.hidden * shape.inter


def result_row(shape: MoeShape, num_tokens: int, case: Case, config: MoeLaunchConfig, copy_gbps: float | None) -> dict:
    ref = fused_moe_ref(case.x.float(), case.w13.float(), case.w2.float(), case.weights, case.ids)
    us, err = measure(case, config, ref)
    base_us, _ = measure(case, heuristic_config(num_tokens * shape.top_k, shape.num_experts), ref)
    moved, flops = expert_bytes_flops(shape, num_tokens, case.touched_experts, case.x.element_size())
    gbps = moved / (us * 1e-6) / 1e9
    return dict(tokens=num_tokens, us=us, heuristic_us=base_us, rel_err=err, touched_experts=case.touched_experts,
                gbps=gbps, pct_copy=100 * gbps / copy_gbps if copy_gbps else None, tflops=flops / (us * 1e-6) / 1e12)


def print_row(row: dict, config: MoeLaunchConfig) -> None:
    def tile(t: MoeTile) -> str:
        return f"({t.block_n},{t.block_k},{t.group_m},{t.num_warps},{t.num_stages})"

    pct = f"{row['pct_copy']:5.1f}%" if row["pct_copy"] is not None else "    -"
    print(f"{row['tokens']:>6} {config.block_m:>4} {tile(config.gate_up):>20} {tile(config.down):>20} {row['us']:9.1f} "
          f"{row['heuristic_us']:9.1f} {row['heuristic_us'] / row['us']:6.2f}x {row['gbps']:7.0f} {pct} {row['tflops']:7.1f}"
          f"  err {row['rel_err']:.1e}", flush=True)


def write_table(path: str, device: str, entries: dict, measured: dict) -> None:
    """Merge into `path`: the kernel reads "shapes"; "measured" keeps the sweep's figures."""
    table = {"shapes": {}, "measured": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    import triton

    table.update(device=device, triton=triton.__version__, torch=torch.__version__, written_by="loadtests/tune_moe.py")
    for section, new in (("shapes", entries), ("measured", measured)):
        for key, by_tokens in new.items():
            table.setdefault(section, {}).setdefault(key, {}).update(by_tokens)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)


def tune_shape(shape: MoeShape, plan: dict, dtype, device, copy_gbps, deadline: float, log) -> tuple[dict, dict]:
    w13, w2 = make_weights(shape, dtype, device)
    print(f"\n== {shape.name}: E={shape.num_experts} top_k={shape.top_k} H={shape.hidden} I={shape.inter} {dtype}")
    print(f"{'tokens':>6} {'bm':>4} {'gate_up (n,k,g,w,s)':>20} {'down (n,k,g,w,s)':>20} {'us':>9} {'heur us':>9} "
          f"{'speedup':>7} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>7}")
    entries, measured = {}, {}
    for num_tokens, candidates in plan.items():
        if time.monotonic() > deadline:
            print(f"  budget spent: skipped {shape.name} at {num_tokens} tokens and after")
            break
        case = make_case(shape, num_tokens, w13, w2)
        config = sweep_case(case, candidates, log)
        if config is None:
            print(f"  {num_tokens} tokens: no candidate passed")
            continue
        row = result_row(shape, num_tokens, case, config, copy_gbps)
        print_row(row, config)
        entries[str(num_tokens)], measured[str(num_tokens)] = config.to_json(), row
    return entries, measured


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="names from loadtests/shapes.py (comma-separated) or E,k,H,I; ';' between groups")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS)
    parser.add_argument("--tp", type=int, default=1, help="tune each rank's slice of the experts (I / tp)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None,
                        help="table (.json) to write or merge into; else a folder: <folder>/<device>.json (default: .)")
    parser.add_argument("--budget-s", type=float, default=180.0, help="start no new case after this many seconds")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="compile processes")
    parser.add_argument("--small-grid", action="store_true", help="two tiles per GEMM (the CPU test)")
    parser.add_argument("--verbose", action="store_true", help="print every GEMM's best tiles per block_m")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("needs CUDA (or TRITON_INTERPRET=1 to run the Triton interpreter on CPU)")
        return 2
    deadline = time.monotonic() + args.budget_s
    dtype = getattr(torch, args.dtype)
    shapes = parse_shapes(args.shapes, args.tp)
    plans = {s: sweep_plan(s, [int(t) for t in args.tokens.split(",")], args.small_grid) for s in shapes}
    log = print if args.verbose else (lambda *_: None)
    copy_gbps = None
    pool = None
    if device.type == "cuda":
        from gpu_kernels import copy_bandwidth_gbps

        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        compiles = {s: submit_compiles(pool, s, plans[s], dtype, args.jobs) for s in shapes}
        copy_gbps = copy_bandwidth_gbps()
        print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write); {sum(map(len, compiles.values()))} compile batches on {args.jobs} processes")
    name = device_name(device)
    out = args.out or "."
    if not out.endswith(".json"):  # a folder, made if missing
        out = os.path.join(out, table_file_name(name))
    written = 0
    try:
        for shape in shapes:
            if pool is not None:
                wait_for_compiles(shape, compiles[shape])
            entries, measured = tune_shape(shape, plans[shape], dtype, device, copy_gbps, deadline, log)
            key = shape_key(shape.num_experts, shape.inter, shape.hidden, shape.top_k, dtype)
            if entries:  # written after each shape, so a run cut short keeps what it finished
                write_table(out, name, {key: entries}, {key: measured})
                written += len(entries)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # waits for the batches running (a few compiles each)
    print(f"\nwrote {written} entries to {out}: commit it as kernels/moe_configs/{table_file_name(name)}")
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())

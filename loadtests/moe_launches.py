"""Kernel launches of one MoE layer's forward at decode sizes: router, routing (softmax, top k and
renormalising in one kernel), alignment, the two grouped GEMMs, the sum over the k slots (and
Qwen2-MoE's shared expert).

On CUDA: every CUDA kernel (and memset/memcpy) torch.profiler records in one forward after a
warm-up, by name. On CPU (TRITON_INTERPRET=1; the layer's kernels go through the interpreter as
`ops.FORCE_TRITON` routes them): the aten ops that are kernels on a GPU (views and allocations left
out) and the Triton launches; the interpreter's own tensor work inside a launch is not counted.
Also checks, on the device, that the routing picks the experts of torch's softmax over the
logits cast to fp32 and its top k (transformers' routing), with weights within fp32 rounding.

    python loadtests/moe_launches.py --shape qwen3-30b-a3b --tokens 1,64,256   (both alignments)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from shapes import SHAPES, moe_experts  # noqa: E402
from splitserve.kernels import activation, fused_moe as moe_kernels, moe_align, moe_route, ops, rms_norm  # noqa: E402
from splitserve.kernels.ops import route_topk  # noqa: E402
from splitserve.shared.model.moe import SparseMoE  # noqa: E402

ALIGNMENTS = {"triton": moe_align.align_pairs_by_expert, "torch": moe_align.align_pairs_by_expert_ref}

# aten ops that launch nothing on a GPU: views, metadata, allocations
NOT_KERNELS = {
    "view", "reshape", "_reshape_alias", "expand", "t", "transpose", "slice", "select", "unsqueeze",
    "squeeze", "as_strided", "alias", "detach", "_unsafe_view", "empty", "empty_like", "empty_strided",
    "lift_fresh", "contiguous", "permute", "numpy_T", "split", "unbind", "unflatten",
}


def triton_kernels() -> list[tuple[object, str]]:
    """(module, name) of every Triton kernel the kernels package defines."""
    return [(module, name) for module in (activation, moe_kernels, moe_align, moe_route, rms_norm) for name in dir(module)
            if name.endswith("_kernel") and hasattr(getattr(module, name), "run")]


class LaunchCount(TorchDispatchMode):
    """Counts aten kernel ops and (via `triton_launch`) Triton launches, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: collections.Counter = collections.Counter()
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and name not in NOT_KERNELS:
            self.launches[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    def triton_launch(self, kernel_name: str, run):
        def counted(*args, **kwargs):
            self.launches[f"triton.{kernel_name}"] += 1
            self.in_triton += 1
            try:
                return run(*args, **kwargs)
            finally:
                self.in_triton -= 1

        return counted


def count_cpu(layer: SparseMoE, x: torch.Tensor) -> collections.Counter:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU this needs TRITON_INTERPRET=1 (the Triton kernels run in the interpreter)")
    counter = LaunchCount()
    ops.FORCE_TRITON = True
    patched = [(getattr(m, n), getattr(m, n).run) for m, n in triton_kernels()]
    try:
        for kernel, run in patched:
            kernel.run = counter.triton_launch(kernel.fn.__name__, run)
        with counter:
            layer(x)
    finally:
        for kernel, run in patched:
            kernel.run = run
        ops.FORCE_TRITON = False
    return counter.launches


def count_cuda(layer: SparseMoE, x: torch.Tensor) -> collections.Counter:
    layer(x)  # compiles, fills the allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    return collections.Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def build_layer(spec: str, device: torch.device, dtype: torch.dtype) -> SparseMoE:
    """A name from loadtests/shapes.py, or `E,k,H,I[,shared I]`; random weights."""
    if spec in SHAPES:
        num_experts, top_k, inter = moe_experts(spec)
        hidden, shared = SHAPES[spec]["hidden_size"], SHAPES[spec].get("shared_expert_intermediate_size", 0)
        renormalize = SHAPES[spec].get("norm_topk_prob", True)
    else:
        num_experts, top_k, hidden, inter, *rest = (int(v) for v in spec.split(","))
        shared, renormalize = (rest or [0])[0], True
    with torch.device(device):  # built where it runs: a 30B-class layer's random init on the GPU
        layer = SparseMoE(hidden, num_experts, top_k, inter, renormalize, "silu", shared)
        with torch.no_grad():
            for param in layer.parameters():
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    return layer.to(dtype=dtype)


def routing_matches_torch(num_tokens: int, num_experts: int, top_k: int, device: torch.device) -> tuple[bool, float]:
    """(same experts in the same slots, largest weight difference) against torch's routing."""
    logits = torch.randn(num_tokens, num_experts, device=device, dtype=torch.bfloat16)
    weights, ids = route_topk(logits, top_k, renormalize=True)
    cast_w, cast_ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return torch.equal(ids, cast_ids), (weights - cast_w / cast_w.sum(-1, keepdim=True)).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b", help="a shapes.py name or E,k,H,I[,shared I]")
    parser.add_argument("--tokens", default="1,64,256")
    parser.add_argument("--align", choices=("triton", "torch", "both"), default="both",
                        help="torch: the alignment's torch reference ops (the layer before its Triton alignment)")
    args = parser.parse_args(argv)
    for align in ("triton", "torch") if args.align == "both" else (args.align,):
        moe_kernels.align_pairs_by_expert = ALIGNMENTS[align]
        count_layer(args.shape, [int(t) for t in args.tokens.split(",")], align)
    return 0


def count_layer(shape: str, tokens: list[int], align: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = build_layer(shape, device, dtype)
    count = count_cuda if device.type == "cuda" else count_cpu
    for num_tokens in tokens:
        x = torch.randn(num_tokens, layer.gate.in_features, device=device, dtype=dtype)
        with torch.no_grad():
            launches = count(layer, x)
        print(f"{align} alignment, T={num_tokens}: {sum(launches.values())} launches per MoE layer")
        for name, n in sorted(launches.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:3d}  {name}")
        same_ids, weight_diff = routing_matches_torch(num_tokens, layer.experts.num_experts, layer.top_k, device)
        print(f"  routing vs torch's softmax(.float()) top-k: same experts {same_ids}, weights within {weight_diff:.1e}")


if __name__ == "__main__":
    raise SystemExit(main())

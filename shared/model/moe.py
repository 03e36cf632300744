"""The mixture-of-experts MLP as a layer kind: a router, top-k routing and stacked experts.

    router_logits = gate(x)                                  # [T, E]
    weights, ids = topk of softmax(router_logits)            # [T, k], renormalised per the config
    out = ops.fused_moe(x, w13, w2, weights, ids)            # [T, H]

The experts' weights are stacked, `w13 [E, 2I, H]` (each expert's gate rows then up rows) and
`w2 [E, H, I]`, so one kernel serves all of them. Checkpoints store them per expert; the family's
`checkpoint_name` maps each expert tensor to a shard `(expert, "gate" | "up" | "down")` of them.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels import ops
from splitserve.shared.model.layers import GatedMLP, check_activation
from splitserve.shared.model.parallel_layers import even_slice
from splitserve.shared.parallel import state


class StackedExperts(nn.Module):
    """Every expert's gate/up (w13) and down (w2) matrices. Tensor-parallel experts (vLLM's default
    without expert parallelism): each rank holds every expert's slice of the intermediate channels,
    so `forward` returns a partial sum that the caller all-reduces."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.channels = even_slice(intermediate_size, "the experts' intermediate size")
        self.num_experts, self.intermediate_size = num_experts, self.channels.size  # this rank's
        self.activation = check_activation(hidden_act)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate_size))

    def shards(self, param_name: str) -> list[tuple[int, str]]:
        kinds = ("gate", "up") if param_name == "w13" else ("down",)
        return [(e, kind) for e in range(self.num_experts) for kind in kinds]

    def load_shard(self, param_name: str, shard: tuple[int, str], tensor: torch.Tensor) -> None:
        """One expert's gate, up ([I, H]) or down ([H, I]) matrix: this rank's channels of it into
        its slice of the stack."""
        expert, kind = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (the config has {self.num_experts})")
        target = getattr(self, param_name).data[expert]
        full, start, size = self.channels.full, self.channels.start, self.channels.size
        channel_dim = 1 if kind == "down" else 0
        if tensor.dim() == 2 and tensor.shape[channel_dim] == full:
            tensor = tensor.narrow(channel_dim, start, size)
        if kind != "down":
            target = target.narrow(0, 0 if kind == "gate" else size, size)
        if target.shape != tensor.shape:
            raise ValueError(f"expert {expert} {kind}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.w13, self.w2, weights, ids, self.activation)


class SparseMoE(nn.Module):
    """Routed experts, plus (Qwen2-MoE) a shared expert that every token passes, scaled by
    `sigmoid(shared_expert_gate(x))`."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        hidden_act: str,
        shared_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size, hidden_act)
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, False, hidden_act)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.has_shared_expert = bool(shared_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = ops.route_topk(self.gate(x), self.top_k, self.renormalize)  # [T, k]
        out = state.all_reduce(self.experts(x, weights, ids))  # [T, H]
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def expert_name(hf_name: str, projections: dict[str, str]) -> tuple[str, tuple[int, str]] | None:
    """'...mlp.experts.3.<proj>.weight' -> ('...mlp.experts.w13', (3, 'gate')), where `projections`
    maps the checkpoint's per-expert projection names to gate/up/down; None if not an expert tensor."""
    head, sep, tail = hf_name.partition(".experts.")
    parts = tail.split(".")
    if not sep or len(parts) != 3 or not parts[0].isdigit() or parts[1] not in projections or parts[2] != "weight":
        return None
    kind = projections[parts[1]]
    return f"{head}.experts.{'w2' if kind == 'down' else 'w13'}", (int(parts[0]), kind)

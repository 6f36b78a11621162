"""A mixture-of-experts layer: the router's top-k and the experts' weights stacked the way vLLM stacks them.

w13 [E_local, 2 * I_part, H] holds each expert's gate (w1) rows then its up (w3) rows, w2 [E_local, H, I_part] its
down projection. Under tensor parallelism every rank holds every expert with its intermediate dim split, as
RowParallelLinear splits a dense MLP; under expert parallelism (`tp.expert_parallel`) each rank holds whole
experts, a contiguous range of them. Either way every rank routes all of the step's tokens (the hidden states are
replicated across the group) and adds up its part of each token's output, and the all-reduce combines the ranks'
parts: dispatch is the replicated input, combine the all-reduce.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import fused_experts, fused_experts_ref, topk_route, topk_route_ref
from engine.layers.linear import linear
from engine.layers.quantization import linear_method_for_new_layer
from engine.parallel_state import TPGroup

# checkpoint expert projection -> (our parameter, shard of it)
EXPERT_WEIGHTS = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"), "down_proj": ("w2_weight", "w2"),
                  "w1": ("w13_weight", "w1"), "w3": ("w13_weight", "w3"), "w2": ("w2_weight", "w2")}


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool,
                 tp: TPGroup, dtype: torch.dtype, scoring: str = "softmax"):
        super().__init__()
        if linear_method_for_new_layer() is not None:  # else FP8/INT4 expert tensors would load as plain weights
            raise ValueError("quantized mixture-of-experts models are not supported yet: the fused-MoE kernels take "
                             "16-bit expert weights")
        self.num_experts, self.top_k, self.renormalize, self.scoring = num_experts, top_k, renormalize, scoring
        self.tp = tp
        self.hidden, self.intermediate = hidden, intermediate
        if tp.expert_parallel and tp.size > 1:
            base, extra = divmod(num_experts, tp.size)  # the first `extra` ranks hold one more
            self.first_expert = tp.rank * base + min(tp.rank, extra)
            self.num_local = base + (tp.rank < extra)
            self.inter_part, self.inter_start = intermediate, 0
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            local = slice(self.first_expert, self.first_expert + self.num_local)
            expert_map[local] = torch.arange(self.num_local, dtype=torch.int32)
            self.register_buffer("expert_map", expert_map, persistent=False)
        else:
            assert intermediate % tp.size == 0, f"expert intermediate {intermediate} does not split over {tp.size} ranks"
            self.first_expert, self.num_local = 0, num_experts
            self.inter_part = intermediate // tp.size
            self.inter_start = tp.rank * self.inter_part
            self.expert_map = None
        self.w13_weight = nn.Parameter(torch.empty(self.num_local, 2 * self.inter_part, hidden, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(self.num_local, hidden, self.inter_part, dtype=dtype),
                                      requires_grad=False)
        self.use_triton = False

    def is_local(self, expert: int) -> bool:
        return self.first_expert <= expert < self.first_expert + self.num_local

    def param_shards(self, param: nn.Parameter) -> list:
        """The checkpoint tensors `param` is loaded from, as the loader's shard ids (global expert, w1/w3/w2)."""
        experts = range(self.first_expert, self.first_expert + self.num_local)
        names = ("w1", "w3") if param is self.w13_weight else ("w2",)
        return [(e, w) for e in experts for w in names]

    def checkpoint_shape(self, shard: tuple[int, str]) -> tuple[int, int]:
        return (self.hidden, self.intermediate) if shard[1] == "w2" else (self.intermediate, self.hidden)

    def describe_shard(self, name: str, shard: tuple[int, str]) -> str:
        """A checkpoint tensor in words, for load errors: `name` is this module's path in the model."""
        expert, which = shard
        proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[which]
        return f"{name}.{expert}.{proj} ({which}) of shape {list(self.checkpoint_shape(shard))}"

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, which = shard
        expected = self.checkpoint_shape(shard)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {expert}'s {which} has shape {list(loaded.shape)}, expected {list(expected)}")
        local = expert - self.first_expert
        if which == "w2":
            param.data[local].copy_(loaded.narrow(1, self.inter_start, self.inter_part))
        else:
            rows = loaded.narrow(0, self.inter_start, self.inter_part)
            param.data[local].narrow(0, 0 if which == "w1" else self.inter_part, self.inter_part).copy_(rows)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H], summed over the group."""
        route, experts = (topk_route, fused_experts) if self.use_triton else (topk_route_ref, fused_experts_ref)
        weights, ids = route(router_logits, self.top_k, self.renormalize, self.scoring)
        out = experts(x, self.w13_weight, self.w2_weight, weights, ids, self.expert_map)
        return self.tp.all_reduce(out)

    def add_to(self, x: torch.Tensor, router_logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += self(x, router_logits), in place. On one GPU with a few tokens the add is the last step of
        the few-token down kernel rather than a kernel of its own."""
        if not self.use_triton or self.tp.size > 1:  # the sum is complete only after the all-reduce
            return residual.add_(self(x, router_logits))
        weights, ids = topk_route(router_logits, self.top_k, self.renormalize, self.scoring)
        return fused_experts(x, self.w13_weight, self.w2_weight, weights, ids, self.expert_map, residual=residual)


class ReplicatedLinear(nn.Module):
    """A small projection every rank holds whole (the router, the shared expert's gate): no bias, no reduce."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x, None)  # a batch-1 decode row takes the matrix-vector kernel

"""Linear layers sharded Megatron-style over a tensor-parallel group, each knowing how to load its slice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import gemv
from engine.parallel_state import TPGroup


def takes_gemv(layer: nn.Module, x: torch.Tensor) -> bool:
    """A batch-1 decode row on the Triton path takes the matrix-vector kernel, which reads the weights faster than
    cuBLAS does at M = 1."""
    return layer.use_triton and x.dim() == 2 and x.shape[0] == 1


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias."""
    return gemv(x, layer.weight, bias) if takes_gemv(layer, x) else F.linear(x, layer.weight, bias)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; the parts are given as (name, full size) `shards`, concatenated."""

    def __init__(self, in_features: int, shards: list[tuple[str, int]], bias: bool, tp: TPGroup,
                 dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        for name, size in shards:
            assert size % tp.size == 0, f"{name}: {size} output features do not split over {tp.size} ranks"
        self.shard_sizes = {name: size // tp.size for name, size in shards}
        self.checkpoint_sizes = dict(shards)  # each part's rows in a fused checkpoint tensor
        self.shard_offsets, offset = {}, 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(offset, dtype=dtype), requires_grad=False) if bias else None
        self.use_triton = False

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        """`shard` None: a checkpoint tensor holding every part, concatenated (Phi-3's qkv_proj, gate_up_proj)."""
        if shard is None:
            start = 0
            for name, rows in self.checkpoint_sizes.items():
                self.load(param, loaded.narrow(0, start, rows), name)
                start += rows
            return
        size, offset = self.shard_sizes[shard], self.shard_offsets[shard]
        part = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. KV heads are split across ranks, or replicated when there are fewer than ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype):
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        kv_size = num_kv_heads * self.kv_replicas * head_dim
        super().__init__(hidden, [("q", num_heads * head_dim), ("k", kv_size), ("v", kv_size)], bias, tp, dtype)
        self.head_dim = head_dim
        self.checkpoint_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        if shard in (None, "q") or self.kv_replicas == 1:
            return super().load(param, loaded, shard)
        size, offset = self.shard_sizes[shard], self.shard_offsets[shard]  # one KV head per rank group
        kv_head = self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, kv_head * self.head_dim, self.head_dim))


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        assert in_features % tp.size == 0, f"{in_features} input features do not split over {tp.size} ranks"
        self.tp = tp
        self.in_part = in_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_features, self.in_part, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.use_triton = False

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        if param is self.bias:
            param.data.copy_(loaded)
        else:
            param.data.copy_(loaded.narrow(1, self.tp.rank * self.in_part, self.in_part))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None  # added once, not tp times
        return self.tp.all_reduce(linear(self, x, bias))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; each rank looks up its own range and the partial rows are summed."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.part = -(-vocab_size // tp.size)
        self.start = tp.rank * self.part
        self.weight = nn.Parameter(torch.zeros(self.part, hidden, dtype=dtype), requires_grad=False)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        rows = loaded[self.start: self.start + self.part]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.part)
        out = F.embedding(local.clamp(0, self.part - 1), self.weight) * mask.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocab range, gathered into the full vocab."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__(vocab_size, hidden, tp, dtype)
        self.use_triton = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(self, hidden, None)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits)
        return logits[:, : self.vocab_size]

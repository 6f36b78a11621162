"""Linear layers sharded Megatron-style over a tensor-parallel group, each knowing how to load its slice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import gemv
from engine.layers.onednn import onednn_linear, pack_weight, packs_weights
from engine.layers.quantization import linear_method_for_new_layer
from engine.layers.quantization.parts import InPart, OutPart
from engine.parallel_state import TPGroup


def takes_gemv(layer: nn.Module, x) -> bool:
    """A batch-1 decode row on the Triton path takes the matrix-vector kernel, which reads the weights faster than
    cuBLAS does at M = 1 (plain, FP8 per-channel or INT4 weights)."""
    return (layer.use_triton and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 1
            and gemv_weights(layer) is not None)


def takes_fp8_rows(layer: nn.Module) -> bool:
    """On the Triton path the layer quantizes its input per token to FP8, so the kernel before it may hand it FP8
    rows and their scales instead (quantization.fp8.Fp8Rows), saving a kernel and a pass over the activations."""
    method = quant_method(layer)
    return layer.use_triton and method is not None and getattr(method, "takes_fp8_rows", lambda: False)()


def quant_method(layer: nn.Module):
    """The layer's quantized-weight method (engine/layers/quantization); None for plain weights."""
    return getattr(layer, "quant_method", None)


def gemv_weights(layer: nn.Module) -> dict | None:
    """The matrix-vector kernel's weight arguments for this layer (weight, and for FP8 its scales and whether x is
    quantized); None where the layer's quantization has no matrix-vector form."""
    method = quant_method(layer)
    if method is None:
        return {"weight": layer.weight}
    form = getattr(method, "gemv_weights", None)
    return form(layer) if form is not None else None


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias."""
    if takes_gemv(layer, x):
        return gemv(x, bias=bias, **gemv_weights(layer))
    if quant_method(layer) is not None:
        return layer.quant_method.apply(layer, x, bias)
    packed = getattr(layer, "onednn_weight", None)  # CPU: engine/layers/onednn.py
    if packed is not None:
        return onednn_linear(x, packed, bias)
    return F.linear(x, layer.weight, bias)


def _create_weight(layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
    layer.quant_method = linear_method_for_new_layer()
    if layer.quant_method is None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
    else:
        layer.quant_method.create_weights(layer, out_features, in_features, dtype)


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
        _create_weight(self, offset, in_features, dtype)
        self.bias = nn.Parameter(torch.empty(offset, dtype=dtype), requires_grad=False) if bias else None
        self.use_triton = False

    def out_part(self, shard: str, base: int = 0) -> OutPart:
        """This rank's rows of the checkpoint's `shard` tensor and where they go in the fused weight; `base`: the
        part's first row in a checkpoint tensor that holds every part."""
        size = self.shard_sizes[shard]
        return OutPart(base + self.tp.rank * size, size, self.shard_offsets[shard])

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        """`shard` None: a checkpoint tensor holding every part, concatenated (Phi-3's qkv_proj, gate_up_proj)."""
        if shard is not None:
            return self.load_part(param, loaded, self.out_part(shard))
        base = 0
        for name, rows in self.checkpoint_sizes.items():
            self.load_part(param, loaded, self.out_part(name, base))
            base += rows

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, part: OutPart) -> None:
        if self.quant_method is not None and param is not self.bias:
            return self.quant_method.load(self, param, loaded, part, None)
        param.data.narrow(0, part.offset, part.size).copy_(loaded.narrow(0, part.start, part.size))

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

    def out_part(self, shard: str, base: int = 0) -> OutPart:
        if shard == "q" or self.kv_replicas == 1:
            return super().out_part(shard, base)
        kv_head = self.tp.rank // self.kv_replicas  # one KV head per rank group
        return OutPart(base + kv_head * self.head_dim, self.head_dim, self.shard_offsets[shard])


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        assert in_features % tp.size == 0, f"{in_features} input features do not split over {tp.size} ranks"
        self.tp = tp
        self.in_part = in_features // tp.size
        _create_weight(self, out_features, self.in_part, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.use_triton = False

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        if param is self.bias:
            param.data.copy_(loaded)
        elif self.quant_method is not None:
            self.quant_method.load(self, param, loaded, None, InPart(self.tp.rank * self.in_part, self.in_part))
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


def pack_linear_weights(model: nn.Module) -> int:
    """On CPU (engine/layers/onednn.py): give every plain linear layer of `model` (one with a `weight` [out, in])
    a packed copy of its weight, and drop the weight unless another module shares it (an embedding tied to the LM
    head keeps it). A 16-bit model's LM head is packed in float32, so its logits are computed and kept in float32:
    bfloat16 logits, 8 bits of mantissa, tie and swap close candidates (with the float32 residual stream of
    RMSNorm's torch path, SmolLM2's greedy bfloat16 answers equal float32's on 96% of the first 16 tokens of 50
    chat prompts, against 76% without either). Returns the number of layers packed."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    packed = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        weight = getattr(module, "weight", None)
        if quant_method(module) is not None or weight is None or not packs_weights(weight.dtype):
            continue
        if isinstance(module, ParallelLMHead):
            weight = weight.float()
        module.onednn_weight = pack_weight(weight)
        if uses[id(module.weight)] == 1:
            module.weight = None
        packed += 1
    return packed

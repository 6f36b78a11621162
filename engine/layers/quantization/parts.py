"""Where a tensor-parallel rank's part of a checkpoint tensor goes in a (possibly fused) layer's parameter, for
quantized weights and their scales alike: output rows of a column-parallel layer, input columns of a row-parallel
one, counted in elements, or in blocks for block-wise scales."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class OutPart(NamedTuple):
    start: int  # first output row of this rank's part in the checkpoint tensor
    size: int  # rows
    offset: int  # first row in the (fused) parameter


class InPart(NamedTuple):
    start: int
    size: int


def parameter(data: torch.Tensor, computed: bool = False) -> nn.Parameter:
    """computed: made while loading (online quantization's scales), not read from the checkpoint."""
    p = nn.Parameter(data, requires_grad=False)
    p.computed = computed
    return p


def _blocks(what: str, start: int, size: int, block: int, blocks: int) -> tuple[int, int]:
    """(first block, blocks) of [start, start + size) in a dim of `blocks` blocks: the part must begin on a block
    edge and end on one or in the last block (a tensor's end need not be a whole block)."""
    first, count = start // block, -(-size // block)
    if start % block or (size % block and first + count != blocks):
        raise ValueError(f"{what} [{start}, {start + size}) do not align to the {block}-wide blocks of the weight "
                         "scales: the tensor-parallel size (or a fused layer's parts) must split them on block edges")
    return first, count


def copy_part(dst: torch.Tensor, loaded, out_part: OutPart | None, in_part: InPart | None,
              block: tuple[int, int] = (1, 1), out_dim: int = 0, in_dim: int = 1) -> None:
    """dst[this part] = loaded[this rank's part]; `block`: dst and loaded hold one value per (bn x bk) block."""
    src = loaded
    if out_part is not None:
        first, count = _blocks("output rows", out_part.start, out_part.size, block[0], loaded.shape[out_dim])
        offset, _ = _blocks("fused output rows", out_part.offset, out_part.size, block[0], dst.shape[out_dim])
        src = src.narrow(out_dim, first, count)
        dst = dst.narrow(out_dim, offset, count)
    if in_part is not None:
        first, count = _blocks("input columns", in_part.start, in_part.size, block[1], loaded.shape[in_dim])
        src = src.narrow(in_dim, first, count)
    dst.copy_(src[...] if not isinstance(src, torch.Tensor) else src)

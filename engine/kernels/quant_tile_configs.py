"""Tile sizes of the quantized matmuls (FP8 `scaled_mm`, INT4 `int4_mm`) and of the 16-bit matrix-vector kernel
(gemv.py, batch-1 decode) per weight shape and GPU, in vLLM's format.

A tuned file `configs/N={N},K={K},device_name={GPU},dtype={fp8_w8a8|int4_w4a16|bf16}[,block_shape=[bn,bk]].json` (the
names of vLLM's block-FP8 files) maps a row count M to BLOCK_SIZE_M/N/K, num_warps and num_stages; the entry
nearest M is used. `benchmarks/quant_tuning.py` writes them on the GPU they are for. Without one, the defaults
below apply.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch

from .moe_tile_configs import CONFIG_DIR
from ._triton import next_pow2

MAX_GEMV_ROWS = 8  # up to this many rows of x (batch-1 decode) take the matrix-vector form: no tensor-core tile
# FP8 takes it for one row only. Its matrix-vector form of 2 to 8 rows sums a [rows, N, K] product every K tile:
# in W3 on an H100, the last 18 decode steps (8 sequences or fewer left) spent 0.49 s in it, 27 ms a step, where
# W1's one-row steps spend 3.3 ms in the one-row form. A 16-row tensor-core tile, 15 of its rows padding at one
# row, read gate/up's FP8 weights at 3.7 TB/s on an H200.
FP8_GEMV_ROWS = 1


def gemv_rows(dtype: str) -> int:
    """The most rows of x that take the matrix-vector form for this weight dtype."""
    return FP8_GEMV_ROWS if dtype == "fp8_w8a8" else MAX_GEMV_ROWS


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    fold_norm: bool = True  # 16-bit gemv after an RMSNorm: False where a separate norm kernel first was faster

    def as_vllm(self) -> dict:
        entry = dict(BLOCK_SIZE_M=self.block_m, BLOCK_SIZE_N=self.block_n, BLOCK_SIZE_K=self.block_k,
                     num_warps=self.num_warps, num_stages=self.num_stages)
        return entry if self.fold_norm else dict(entry, fold_norm=False)

    @classmethod
    def from_vllm(cls, entry: dict) -> TileConfig:
        return cls(entry["BLOCK_SIZE_M"], entry["BLOCK_SIZE_N"], entry["BLOCK_SIZE_K"], entry.get("num_warps", 4),
                   entry.get("num_stages", 3), entry.get("fold_norm", True))


def config_file_name(n: int, k: int, dtype: str, device_name: str, block: tuple[int, int] | None = None) -> str:
    shape = f",block_shape=[{block[0]},{block[1]}]" if block else ""
    return f"N={n},K={k},device_name={device_name.replace(' ', '_')},dtype={dtype}{shape}.json"


@functools.lru_cache(maxsize=None)
def tuned_configs(n: int, k: int, dtype: str, device_name: str,
                  block: tuple[int, int] | None = None) -> dict[int, TileConfig] | None:
    path = CONFIG_DIR / config_file_name(n, k, dtype, device_name, block)
    if not path.exists():
        return None
    return {int(m): TileConfig.from_vllm(entry) for m, entry in json.loads(path.read_text()).items()}


def default_config(m: int, k: int, dtype: str) -> TileConfig:
    """FP8, tensor-core form: the fastest tiles of an H100 sweep on Llama-3-8B shapes (16 rows: 16x64x128, 8 warps,
    or 16x64x256 for K = 14336; 256 rows: 128x64x128, 8 warps, 4 stages; each 1.2-1.7x the 64x64x64 tiles); 2 to 8
    rows take the 16-row tiles. FP8's one-row form: 16 weight rows a program, so that x's conversion is shared by 16
    rows, and 16 KB of weights a K tile. INT4's one-row form: 16 rows by 1,024 values, the fewest instructions a
    weight value in its SASS for Hopper (5.9, against 6.8 at 8 rows) without spilling. The other matrix-vector forms
    keep the tiles their tests and first GPU runs used."""
    if m <= gemv_rows(dtype):
        if dtype == "fp8_w8a8":
            return TileConfig(1, 16, 1024, 8, 2)
        return TileConfig(1, 16, 1024, 4, 2) if m == 1 else TileConfig(next_pow2(m), 16, 128)
    if dtype != "fp8_w8a8":
        return TileConfig(16 if m <= 16 else 64, 64, 64)
    if m <= 16:
        return TileConfig(16, 64, 256, 8, 4) if k >= 8192 else TileConfig(16, 64, 128, 8, 3)
    return TileConfig(64 if m <= 64 else 128, 64, 128, 8, 4)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tile_config(m: int, n: int, k: int, dtype: str, device: torch.device,
                block: tuple[int, int] | None = None) -> TileConfig:
    """The tuned entry nearest `m` (of the same form: matrix-vector up to gemv_rows(dtype) rows, tensor-core tiles
    above) for this weight shape on this GPU, else the default."""
    return tuned_tile(m, n, k, dtype, device, block) or default_config(m, k, dtype)


def tuned_tile(m: int, n: int, k: int, dtype: str, device: torch.device,
               block: tuple[int, int] | None = None) -> TileConfig | None:
    """The tuned entry nearest `m`, of the same form, or None without a file for this shape and GPU. dtype "bf16":
    the 16-bit matrix-vector kernel's tiles (gemv.py; its own defaults apply without a file)."""
    tuned = tuned_configs(n, k, dtype, _device_name(device.index or 0), block) if device.type == "cuda" else None
    return nearest_entry(tuned, m, dtype)


def nearest_entry(tuned: dict[int, TileConfig] | None, m: int, dtype: str) -> TileConfig | None:
    gemv = gemv_rows(dtype)
    same_form = [rows for rows in tuned or () if (rows <= gemv) == (m <= gemv)]
    return tuned[min(same_form, key=lambda rows: abs(rows - m))] if same_form else None

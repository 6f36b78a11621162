"""Paged attention over the KV cache: write the step's keys/values by slot, then attend over each context."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """vLLM's layout: tokens of all sequences concatenated; queries are the last q_len tokens of each context."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, num_kv_heads, head_dim]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq, D]."""
        key_cache = value_cache = None  # no cache yet while profiling: every sequence is a fresh prompt
        if self.kv_cache is not None:
            key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
            write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        return torch_paged_attention(q, k, v, key_cache, value_cache, meta, self.scale)


def write_kv(k, v, key_cache, value_cache, slot_mapping) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = k[valid]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = v[valid]


def torch_paged_attention(q, k, v, key_cache, value_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Reference path on CPU and CUDA. Prompts without a cached prefix attend over their own new k/v;
    decodes are batched over a padded gather of their blocks; other chunks gather their context."""
    out = torch.empty_like(q)
    block_size = key_cache.shape[1] if key_cache is not None else 0
    decodes = [i for i, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)) if n == 1 and ctx > 1]
    starts = meta.query_start_loc.tolist() if len(decodes) < len(meta.query_lens_cpu) else None
    if decodes:
        idx = torch.tensor(decodes, device=q.device)
        rows = meta.query_start_loc[idx].long()
        ctx = max(meta.seq_lens_cpu[i] for i in decodes)
        n_blocks = -(-ctx // block_size)
        tables = meta.block_tables[idx, :n_blocks].long()
        keys = key_cache[tables].flatten(1, 2)[:, :ctx]  # [B, ctx, Hk, D]
        values = value_cache[tables].flatten(1, 2)[:, :ctx]
        mask = torch.arange(ctx, device=q.device)[None, :] < meta.seq_lens[idx][:, None]
        out[rows] = _sdpa(q[rows].unsqueeze(1), keys, values, mask[:, None, None, :], scale).squeeze(1)
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 1 and ctx > 1:
            continue
        s = starts[i]
        if ctx == q_len:
            keys, values, mask = k[s:s + q_len][None], v[s:s + q_len][None], None
        else:
            table = meta.block_tables[i, :-(-ctx // block_size)].long()
            keys = key_cache[table].flatten(0, 1)[:ctx][None]
            values = value_cache[table].flatten(0, 1)[:ctx][None]
            pos_q = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = (torch.arange(ctx, device=q.device)[None, :] <= pos_q[:, None])[None, None]
        out[s:s + q_len] = _sdpa(q[s:s + q_len][None], keys, values, mask, scale, causal=mask is None)[0]
    return out


def _sdpa(q, k, v, mask, scale, causal=False):
    """q: [B, Lq, Hq, D], k/v: [B, Lk, Hk, D] -> [B, Lq, Hq, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o.transpose(1, 2)

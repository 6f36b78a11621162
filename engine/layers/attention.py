"""Paged attention over the KV cache: write the step's keys/values by slot, then attend over each context."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import reshape_and_cache, unified_attention
from engine.kernels.reshape_and_cache import cache_values, cached_values


@dataclass
class TorchAttentionPlan:
    """Per-step index tensors for the torch path, built once per step rather than once per layer."""

    decode_rows: torch.Tensor | None = None  # [D] rows of single-token decodes
    decode_tables: torch.Tensor | None = None  # [D, blocks] their block tables, cut to the longest context
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, ctx] True where a key position is inside the context
    decode_ctx: int = 0
    decode_rows_seq: torch.Tensor | None = None  # [D] their sequence indices
    chunks: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    # (start row, q_len, ctx, block table or None for a fresh prompt, causal mask or None)
    window_masks: dict = field(default_factory=dict)  # (chunk index or "decode", window) -> mask, built on first use


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
    torch_plan: TorchAttentionPlan | None = None


class Attention(nn.Module):
    """sliding_window: each query sees itself and the window - 1 tokens before it (Hugging Face's `sliding_window`);
    None for the whole context. softcap: scores bounded as softcap * tanh(score / softcap) (Gemma 2); None for none."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window, self.softcap = sliding_window, softcap or 0.0
        self.window_size = (sliding_window - 1, 0) if sliding_window else (-1, -1)  # vLLM's (left, right) form
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        # An FP8 cache's per-tensor scales (stored = x / scale): the checkpoint's, or 1.0
        self.k_scale = self.v_scale = 1.0
        self.use_triton = False

    def kv_write(self, v: torch.Tensor, meta: AttentionMetadata) -> tuple | None:
        """(v, key_cache, value_cache, slot_mapping, k_scale, v_scale) for a kernel that stores this step's
        keys/values itself (the rotary kernel on the Triton path), or None where `forward` must store them."""
        if self.use_triton and self.kv_cache is not None:
            return v, self.kv_cache[0], self.kv_cache[1], meta.slot_mapping, self.k_scale, self.v_scale
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_written: bool = False) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq, D]. kv_written: the caller already stored k/v (kv_write)."""
        if self.use_triton and self.kv_cache is not None:
            key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
            if not kv_written:
                reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, self.k_scale, self.v_scale)
            out = torch.empty_like(q)
            return unified_attention(q, key_cache, value_cache, out, meta.query_start_loc, meta.seq_lens,
                                     meta.block_tables, self.scale, meta.max_query_len, meta.max_seq_len,
                                     window_size=self.window_size, softcap=self.softcap, k_scale=self.k_scale,
                                     v_scale=self.v_scale)
        if self.use_triton:  # no cache yet: the profiling step (ModelRunner.profile)
            # The Triton kernels need no memory beyond their output, so the step's peak leaves attention out, as
            # vLLM's backends do when profiling. The torch path's soft-capped scores are whole fp32 matrices: for
            # Gemma-2-9B at 8,192 tokens they cost the KV cache about 8 GiB (308K tokens on an H200 against 332K).
            return torch.zeros_like(q)
        key_cache = value_cache = None  # no cache yet while profiling: every sequence is a fresh prompt
        scales = (self.k_scale, self.v_scale)
        if self.kv_cache is not None:
            key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
            k, v = write_kv(k, v, key_cache, value_cache, meta.slot_mapping, *scales)
        return torch_paged_attention(q, k, v, key_cache, value_cache, meta, self.scale, self.sliding_window,
                                     self.softcap, *scales)


def write_kv(k, v, key_cache, value_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0):
    """Store the step's keys/values at their slots (the torch path never pads, so every slot is real). Returns
    them as the cache holds them (an FP8 cache's rounding included), so a fresh prompt attends over the same keys
    and values as the Triton kernel, which reads them back from the cache.

    Non-finite values (a request whose input drives the model to NaN) are stored as 0: decodes read whole blocks
    and mask the positions past each context, and a masked NaN still poisons the output (0 * NaN), so a NaN left
    in a freed block would break every later request that reuses it. (The Triton kernel never loads those slots.)
    """
    stored = []
    for x, cache, scale in ((k, key_cache, k_scale), (v, value_cache, v_scale)):
        x_cached = cache_values(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), cache.dtype, scale)
        rows = cache.view(-1, *cache.shape[2:])
        if x_cached.dtype != x.dtype:  # FP8: index_copy_ has no e4m3 kernel on CPU; copy the bytes
            rows.view(torch.uint8).index_copy_(0, slot_mapping, x_cached.view(torch.uint8))
            stored.append(cached_values(x_cached, x.dtype, scale))
        else:
            rows.index_copy_(0, slot_mapping, x_cached)
            stored.append(x)
    return stored


def plan_torch_attention(meta: AttentionMetadata, block_size: int, device: torch.device) -> TorchAttentionPlan:
    plan = TorchAttentionPlan()
    starts = [0]
    for n in meta.query_lens_cpu:
        starts.append(starts[-1] + n)
    decodes = [i for i, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)) if n == 1 and ctx > 1]
    if decodes:
        ctx = max(meta.seq_lens_cpu[i] for i in decodes)
        idx = torch.tensor(decodes, device=device)
        plan.decode_rows = torch.tensor([starts[i] for i in decodes], device=device)
        plan.decode_rows_seq = idx
        plan.decode_tables = meta.block_tables[idx, :-(-ctx // block_size)].long()
        plan.decode_mask = (torch.arange(ctx, device=device)[None, :] < meta.seq_lens[idx][:, None])[:, None, None, :]
        plan.decode_ctx = ctx
    is_decode = set(decodes)
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if i in is_decode:
            continue
        table = mask = None
        if ctx != q_len:
            table = meta.block_tables[i, :-(-ctx // block_size)].long()
            pos_q = torch.arange(ctx - q_len, ctx, device=device)
            mask = (torch.arange(ctx, device=device)[None, :] <= pos_q[:, None])[None, None]
        plan.chunks.append((starts[i], q_len, ctx, table, mask))
    return plan


def torch_paged_attention(q, k, v, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                          sliding_window: int | None = None, softcap: float = 0.0, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> torch.Tensor:
    """Reference path on CPU and CUDA. Prompts without a cached prefix attend over their own new k/v;
    decodes are batched over a padded gather of their blocks; other chunks gather their context."""
    if meta.torch_plan is None:
        meta.torch_plan = plan_torch_attention(meta, key_cache.shape[1] if key_cache is not None else 1, q.device)
    plan = meta.torch_plan
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        rows, ctx = plan.decode_rows, plan.decode_ctx
        keys = cached_values(key_cache[plan.decode_tables].flatten(1, 2)[:, :ctx], q.dtype, k_scale)  # [D, ctx, Hk, Dh]
        values = cached_values(value_cache[plan.decode_tables].flatten(1, 2)[:, :ctx], q.dtype, v_scale)
        mask = plan.decode_mask
        if sliding_window:
            mask = _windowed(plan, "decode", sliding_window, lambda: plan.decode_mask & (
                torch.arange(ctx, device=q.device) >= meta.seq_lens[plan.decode_rows_seq][:, None] - sliding_window
            )[:, None, None, :])
        if softcap:
            out[rows] = _sdpa(q[rows].unsqueeze(1), keys, values, mask, scale, softcap=softcap).squeeze(1)
        else:
            out[rows] = _decode_sdpa(q[rows], keys, values, mask, scale)
    for i, (s, q_len, ctx, table, mask) in enumerate(plan.chunks):
        if table is None:
            keys, values = k[s:s + q_len][None], v[s:s + q_len][None]
        else:
            keys = cached_values(key_cache[table].flatten(0, 1)[:ctx][None], q.dtype, k_scale)
            values = cached_values(value_cache[table].flatten(0, 1)[:ctx][None], q.dtype, v_scale)
        causal = table is None
        if sliding_window:
            mask, causal = _windowed(plan, i, sliding_window, lambda: _window_mask(q_len, ctx, sliding_window,
                                                                                    q.device)), False
        out[s:s + q_len] = _sdpa(q[s:s + q_len][None], keys, values, mask, scale, causal, softcap)[0]
    return out


def _windowed(plan: TorchAttentionPlan, key, window: int, build) -> torch.Tensor:
    """A mask under a sliding window, built once per step and shared by the layers with that window."""
    if (key, window) not in plan.window_masks:
        plan.window_masks[key, window] = build()
    return plan.window_masks[key, window]


def _window_mask(q_len: int, ctx: int, window: int, device) -> torch.Tensor:
    """[1, 1, q_len, ctx]: the last q_len of ctx positions each see themselves and the window - 1 before."""
    distance = torch.arange(ctx - q_len, ctx, device=device)[:, None] - torch.arange(ctx, device=device)[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def _sdpa(q, k, v, mask, scale, causal=False, softcap=0.0):
    """q: [B, Lq, Hq, D], k/v: [B, Lk, Hk, D] -> [B, Lq, Hq, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap:  # SDPA has no soft-cap: the scores in full, in fp32
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = softcap * torch.tanh(q.float() @ k.float().transpose(-1, -2) * (scale / softcap))
        if causal:
            mask = _window_mask(q.shape[2], k.shape[2], k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o.transpose(1, 2)


def _decode_sdpa(q, k, v, mask, scale):
    """One new token per sequence: q [B, Hq, D], k/v [B, ctx, Hk, D], mask [B, 1, 1, ctx] -> [B, Hq, D]. The query
    heads sharing a KV head go in as that head's rows, so SDPA reads each key once for all of them; with one row per
    head, SDPA's CPU kernel took 5x longer in bfloat16 (SmolLM2-135M: 1.5 ms against 0.28 ms a layer)."""
    b, hq, d = q.shape
    hk = k.shape[2]
    o = F.scaled_dot_product_attention(q.view(b, hk, hq // hk, d), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return o.reshape(b, hq, d)


def layer_sliding_window(hf_config, layer_idx: int) -> int | None:
    """The sliding window of decoder layer `layer_idx`, None for full attention. Configs with `layer_types` say it
    per layer (Gemma 2/3; Qwen2 with use_sliding_window, from max_window_layers on); others slide in every layer
    when they set `sliding_window` (Mistral v0.1, Phi-3)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window

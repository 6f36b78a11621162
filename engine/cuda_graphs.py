"""CUDA graphs for decode steps: one graph per padded batch size, replayed with the step's inputs copied in.

A decode-only step of n sequences replays the graph of the smallest captured size >= n; the padding rows
write no KV (slot -1) and attend over one cached slot, and their outputs are dropped. A pipeline stage after the
first takes the previous stage's hidden states and residuals as inputs; one before the last returns both. The last
stage's graphs compute the logits too (`with_logits`): a decode step then launches no LM-head matmul of its own,
whose shape (the number of sequences) would change nearly every step. Under tensor parallelism the LM head
all-gathers its vocab shards, a collective not yet run inside these graphs on two GPUs, so there it stays outside.
"""
from __future__ import annotations

import logging

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger("strata")


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8)) + list(range(272, 512 + 1, 16)) + list(range(544, 1024 + 1, 32))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_model_len: int, block_size: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, with_logits: bool = True):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.first, self.last = model.is_first, model.is_last
        self.with_logits = self.last and with_logits
        if not self.first:
            self.in_hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
            self.in_residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        if not self.last:
            self.residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # last stage: each graph's logits, rewritten at each replay

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
                                 max_seq_len=self.max_model_len, query_lens_cpu=[1] * bs, seq_lens_cpu=[])

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(bs)
            inputs = () if self.first else (self.in_hidden[:bs], self.in_residual[:bs])
            hidden, _ = self.model(self.input_ids[:bs], self.positions[:bs], meta, *inputs)
            if self.with_logits:  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
                self.model.logits(hidden)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden, residual = self.model(self.input_ids[:bs], self.positions[:bs], meta, *inputs)
                self.hidden[:bs].copy_(hidden)
                if self.with_logits:
                    self.logits[bs] = self.model.logits(hidden)
                if not self.last:
                    self.residual[:bs].copy_(residual)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def size_for(self, num_seqs: int) -> int | None:
        return next((s for s in self.sizes if s >= num_seqs), None)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """(hidden, residual, logits): residual None on the last stage, logits None on the others (and without
        with_logits). The outputs are the graph's own buffers: the next replay rewrites them."""
        n = positions.shape[0]
        bs = self.size_for(n)
        if self.first:
            self.input_ids[:n].copy_(ids)
        else:
            self.in_hidden[:n].copy_(hidden)
            self.in_residual[:n].copy_(residual)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.graphs[bs].replay()
        if self.last:
            return self.hidden[:n], None, self.logits[bs][:n] if self.with_logits else None
        return self.hidden[:n], self.residual[:n], None

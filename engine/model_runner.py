"""Runs one model shard on one device: turns a step's batch into tensors, runs the forward pass, samples."""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.cuda_graphs import DecodeGraphs
from engine.kernels._triton import HAS_TRITON, interpreting
from engine.layers.attention import AttentionMetadata
from engine.layers.linear import pack_linear_weights
from engine.layers.moe import FusedMoE
from engine.models.loader import load_model
from engine.parallel_state import DeviceTokens, TPGroup
from engine.sampler import Sampler, SamplerLaunch, SamplingState, to_device, top_logprobs
from engine.step import PENDING_TOKEN, BatchInput, StepOutput
from engine.step_inputs import step_arrays

logger = logging.getLogger("strata")


@dataclass
class LaunchedStep:
    """A step whose device work is queued; `ModelRunner.finish` waits for it and reads its output. The local
    executor's step handle: the engine core holds it without looking inside."""

    batch: BatchInput
    rows: list[int] = field(default_factory=list)  # batch rows that sample
    sampled: SamplerLaunch | None = None
    hidden: torch.Tensor | None = None  # kept only when prompt logprobs are asked for
    logits: torch.Tensor | None = None  # until `sample`, for a step launched with bitmask_later
    qsl: list[int] = field(default_factory=list)
    # a stage before the last: its hidden states and residuals, for the next stage
    to_next_stage: tuple[torch.Tensor, torch.Tensor] | None = None


class ModelRunner:
    def __init__(self, model_dir: Path, hf_config, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, seed: int, tp: TPGroup | None = None, layer_range: tuple[int, int] | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False, max_num_seqs: int = 256,
                 custom_all_reduce: bool = True, cpu_threads: int | None = None, expert_parallel: bool = False,
                 quantization: str | None = None, kv_cache_dtype: str = "auto"):
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.kv_cache_dtype = torch.float8_e4m3fn if kv_cache_dtype.startswith("fp8") else dtype
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.hf_config = hf_config
        torch.manual_seed(seed)
        if tp is not None:
            tp.expert_parallel = expert_parallel
        self.model = load_model(model_dir, hf_config, dtype, device, max_model_len, tp, layer_range,
                                quantization=quantization)
        self.one_shot_all_reduce = bool(tp and custom_all_reduce and tp.enable_one_shot_all_reduce(dtype, device))
        self.use_triton = select_kernels(self.model, attention_backend, device)
        self.packed_linears = pack_linear_weights(self.model) if device.type == "cpu" and not self.use_triton else 0
        # Batch-1 decode steps of a single-stage model all-reduce inside their gemvs: two sites a layer, but the
        # last layer's down projection, whose sum the final norm reads from the one-shot buffer.
        single_stage = self.model.is_first and self.model.is_last
        self.fused_all_reduce = bool(self.one_shot_all_reduce and self.use_triton and single_stage and
                                     tp.enable_reduce_sites(2 * hf_config.num_hidden_layers - 1,
                                                            hf_config.hidden_size, dtype, device))
        self.sampler = Sampler(hf_config.vocab_size, device, seed)
        self.states: dict[str, SamplingState] = {}
        self.kv_caches: list[torch.Tensor] = []
        # req id -> its latest launched step's sampled tokens and its row there, for the placeholders of steps
        # launched before the host has those tokens (first stage only)
        self._sampled_rows: dict[str, tuple[DeviceTokens, int]] = {}
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and self.use_triton and not enforce_eager:
            self.graphs = DecodeGraphs(self.model, max_num_seqs, max_model_len, block_size, hf_config.hidden_size,
                                       dtype, device, with_logits=tp is None or tp.size == 1)

    def describe(self) -> dict:
        return {"kernels": "triton" if self.use_triton else "torch", "cuda_graphs": self.graphs is not None,
                "one_shot_all_reduce": self.one_shot_all_reduce, "fused_all_reduce": self.fused_all_reduce,
                "device": str(self.device), "dtype": str(self.dtype),
                "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                "onednn_packed_linears": self.packed_linears,
                "local_experts": next((m.num_local for m in self.model.modules() if isinstance(m, FusedMoE)), None)}

    # -- profiling ------------------------------------------------------------------------------------------
    def start_profile(self, out_dir: str) -> None:
        """Record host and device activity with torch.profiler until stop_profile()."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._profile_dir = Path(out_dir)

    def stop_profile(self) -> str:
        """Stop recording; returns the Chrome trace written under start_profile's directory."""
        self._profiler.__exit__(None, None, None)
        self._profile_dir.mkdir(parents=True, exist_ok=True)
        path = self._profile_dir / f"trace-{str(self.device).replace(':', '')}-pid{os.getpid()}.json"
        self._profiler.export_chrome_trace(str(path))
        self._profiler = None
        return str(path)

    # -- KV cache -------------------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * self.kv_cache_dtype.itemsize

    @torch.inference_mode()
    def profile(self, num_tokens: int, gpu_memory_utilization: float = 0.9) -> int | None:
        """Run a forward pass as large as one step can be, and the logits of as many rows as the largest decode
        step has; return the bytes this device can give the KV cache: its share of memory
        (`gpu_memory_utilization`) less the step's peak, other allocations and other processes. None on CPU (no
        device memory to measure)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        lens, left = [], num_tokens
        while left > 0:
            lens.append(min(left, self.max_model_len))
            left -= lens[-1]
        batch = BatchInput(req_ids=[f"profile-{i}" for i in range(len(lens))], token_ids=[[0] * n for n in lens],
                           start_positions=[0] * len(lens), block_tables=[[] for _ in lens], sample=[True] * len(lens))
        ids, positions, meta, _, _ = self._prepare(batch)
        intermediate = () if self.model.is_first else torch.zeros(  # stands in for the previous stage's output
            2, len(ids), self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        hidden, _, _ = self._forward(ids, positions, meta, *intermediate)
        graph_logits = 0
        if self.model.is_last:  # as many rows of logits as the largest decode step samples
            logits = self.model.logits(hidden[:min(len(ids), self.max_num_seqs)])
            if self.graphs is not None and self.graphs.with_logits:  # the decode graphs keep logits of their own
                graph_logits = logits.numel() * logits.element_size()
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = max(total - free - torch.cuda.memory_reserved(self.device), 0)
        budget = int(total * gpu_memory_utilization) - peak - outside_torch - graph_logits
        gib = 2 ** -30
        logger.info("GPU memory: %.2f GiB x %.2f = %.2f GiB; weights and buffers %.2f GiB, a %d-token step's peak "
                    "%.2f GiB more, outside torch %.2f GiB; left for the KV cache %.2f GiB", total * gib,
                    gpu_memory_utilization, total * gpu_memory_utilization * gib, before * gib, num_tokens,
                    (peak - before) * gib, outside_torch * gib, budget * gib)
        return budget

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        for attn in self.model.attention_layers():
            cache = torch.zeros(2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim,
                                dtype=self.kv_cache_dtype, device=self.device)
            attn.kv_cache = cache
            self.kv_caches.append(cache)
        if self.graphs is not None:
            self.graphs.capture()
        if self.model.is_last and self.device.type == "cuda":
            self.sampler.warm_up(self.dtype)

    # -- one step -------------------------------------------------------------------------------------------
    def _prepare(self, batch: BatchInput):
        a = step_arrays(batch, self.block_size)
        qsl = a.query_start_loc
        # Later pipeline stages take hidden states, not tokens: their placeholders stay as they are.
        ends = qsl[1:].astype(np.int64) - 1
        pending_rows = np.flatnonzero((np.array(a.query_lens) > 0) & (a.ids[ends] == PENDING_TOKEN)) \
            if self.model.is_first and len(a.ids) else np.zeros(0, dtype=np.int64)
        rows = [self._sampled_rows[batch.req_ids[i]] for i in pending_rows.tolist()]
        sources = list(dict.fromkeys(tokens for tokens, _ in rows))  # usually one step's
        offsets = dict(zip(sources, itertools.accumulate((len(s.tensor) for s in sources), initial=0)))
        dst, src = ends[pending_rows], np.array([offsets[tokens] + j for tokens, j in rows], dtype=np.int64)
        # Two host-to-device copies per step, not one per tensor: each costs tens of microseconds of host time.
        longs = self._tensor(np.concatenate([a.ids, a.positions, a.slots, a.last, dst, src]), torch.long)
        ids_t, positions_t, slots_t, last_t, dst_t, src_t = longs.split(
            [len(a.ids), len(a.positions), len(a.slots), len(a.last), len(dst), len(src)])
        ints = self._tensor(np.concatenate([qsl, a.seq_lens, a.block_tables.reshape(-1)]), torch.int32)
        qsl_t, seq_lens_t, tables_t = ints.split([len(qsl), len(a.seq_lens), a.block_tables.size])
        seq_lens = a.seq_lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=slots_t, query_start_loc=qsl_t, seq_lens=seq_lens_t,
            block_tables=tables_t.view(a.block_tables.shape), max_query_len=max(a.query_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=a.query_lens, seq_lens_cpu=seq_lens)
        if rows:  # tokens earlier steps sampled on the device that the host has not seen yet
            tokens = [s.get() for s in sources]
            ids_t[dst_t] = (tokens[0] if len(tokens) == 1 else torch.cat(tokens))[src_t]
        return ids_t, positions_t, meta, qsl.tolist(), last_t

    def _tensor(self, data, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def _forward(self, ids, positions, meta, hidden=None, residual=None):
        """(hidden, residual, logits of every row or None): a decode step replays a CUDA graph, which computes the
        logits too (on the last stage, without tensor parallelism); any other step runs the model as it is."""
        if (self.graphs is not None and self.kv_caches and meta.max_query_len == 1
                and self.graphs.size_for(len(meta.query_lens_cpu)) is not None):
            return self.graphs.run(ids, positions, meta, hidden, residual)
        return *self.model(ids, positions, meta, hidden, residual), None

    def update_states(self, batch: BatchInput) -> None:
        for req_id in batch.finished_ids:
            self.states.pop(req_id, None)
            self._sampled_rows.pop(req_id, None)
        for seq in batch.new_sequences:
            gen = None
            if seq.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(seq.seed)
            self.states[seq.req_id] = SamplingState(seq.params, seq.prompt_token_ids, seq.stop_ids, gen)

    def execute(self, batch: BatchInput) -> StepOutput:
        """One whole step on a single-stage model: launch, then wait for its output."""
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: BatchInput,
               intermediate: tuple[torch.Tensor, torch.Tensor] | None = None) -> LaunchedStep:
        """Queue the step's work on the device and return without waiting for it (on CUDA)."""
        self.update_states(batch)
        if not batch.req_ids:
            return LaunchedStep(batch)
        ids, positions, meta, qsl, last = self._prepare(batch)
        hidden, residual, logits = self._forward(ids, positions, meta, *(intermediate or ()))
        if not self.model.is_last:
            return LaunchedStep(batch, to_next_stage=(hidden, residual))
        step = LaunchedStep(batch, [i for i, s in enumerate(batch.sample) if s], qsl=qsl)
        if any(self.states[r].params.prompt_logprobs is not None for r in batch.req_ids if r in self.states):
            step.hidden = hidden
        if step.rows:
            if logits is None or len(step.rows) < len(batch.req_ids):
                logits = self.model.logits(hidden[last])
            elif batch.bitmask_later:  # sampled after the next step's launch, whose replay rewrites the graph's own
                logits = logits.clone()
            step.logits = logits
            if not batch.bitmask_later:
                self.sample(step, batch.token_bitmask)
        return step

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, token_bitmask) -> None:
        """Queue a launched step's sampling, with structured outputs' bitmask for its constrained rows."""
        batch, states = step.batch, [self.states[step.batch.req_ids[i]] for i in step.rows]
        bitmask = None
        if batch.bitmask_rows:  # constrained rows, as indices among the sampling rows
            sampling_index = {row: j for j, row in enumerate(step.rows)}
            bitmask = (token_bitmask, [sampling_index[r] for r in batch.bitmask_rows])
        step.sampled = self.sampler.launch(step.logits, states, bitmask)
        step.logits = None
        if self.model.is_first:
            self.expect_tokens(batch, DeviceTokens(step.sampled.tokens))

    def expect_tokens(self, batch: BatchInput, tokens: DeviceTokens) -> None:
        """The tokens a launched step samples (on a first pipeline stage: to be received from the last), in the
        order of the batch's sampling rows; later steps' placeholders for these sequences read them."""
        for j, req_id in enumerate(r for r, sample in zip(batch.req_ids, batch.sample) if sample):
            self._sampled_rows[req_id] = (tokens, j)

    @torch.inference_mode()
    def finish(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step; its sampled tokens (and logprobs) on the host."""
        out = StepOutput()
        if step.sampled is not None:
            for i, result in zip(step.rows, self.sampler.finish(step.sampled)):
                out.sampled[step.batch.req_ids[i]] = result
        if step.hidden is not None:
            self._prompt_logprobs(step.batch, step.hidden, step.qsl, out)
        return out

    def discard(self, step: LaunchedStep) -> None:
        """Drop a launched step's output (an earlier step failed): wait for its work, read nothing."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prompt_logprobs(self, batch: BatchInput, hidden: torch.Tensor, qsl: list[int], out: StepOutput) -> None:
        """Logprob of each next prompt token (plus the top-N) at the positions this step computed."""
        for i, req_id in enumerate(batch.req_ids):
            state = self.states.get(req_id)
            if state is None or state.params.prompt_logprobs is None:
                continue
            prompt = state.prompt_token_ids
            start = batch.start_positions[i]
            n = min(len(batch.token_ids[i]), len(prompt) - 1 - start)
            if n <= 0:
                continue
            logprobs = torch.log_softmax(self.model.logits(hidden[qsl[i]: qsl[i] + n]).float(), dim=-1)
            out.prompt_logprobs[req_id] = (start, [top_logprobs(logprobs[j], prompt[start + j + 1],
                                                                state.params.prompt_logprobs) for j in range(n)])


def select_kernels(model: torch.nn.Module, backend: str, device: torch.device) -> bool:
    """Switch the model's layers to the Triton kernels (auto: on CUDA when Triton is installed)."""
    if backend == "triton" and not (HAS_TRITON and (device.type == "cuda" or interpreting())):
        raise ValueError("attention_backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
                         "use attention_backend='torch' or 'auto'")
    use = backend == "triton" or (backend == "auto" and device.type == "cuda" and HAS_TRITON)
    for module in model.modules():
        if hasattr(module, "use_triton"):
            module.use_triton = use
    return use

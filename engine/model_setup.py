"""Resolve a config into concrete choices: model directory, device, dtype, lengths, executor, KV-cache size.

The device and dtype are decided here once (`shard_device`, `shard_dtype`); the runner, the executors and the
engine's defaults read `ModelSetup.device` and `ModelSetup.dtype`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.executor.base import Executor
from engine.layers.quantization import quant_config_for
from engine.model_source import resolve_model
from engine.models import model_class
from engine.models.loader import load_hf_config, weight_files
from engine.tokenizer import eos_token_ids, get_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class ModelSetup:
    config: EngineConfig
    model_dir: Path
    hf_config: object
    tokenizer: object
    eos_token_ids: set[int]
    device: torch.device  # where every shard runs: this process, or the Ray workers of a TP x PP replica
    dtype: torch.dtype
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int

    @classmethod
    def from_config(cls, config: EngineConfig) -> ModelSetup:
        model_dir = resolve_model(config.model, config.revision)
        hf_config = load_hf_config(model_dir)
        model_class(getattr(hf_config, "architectures", None))  # fail early on an unsupported architecture
        weight_files(model_dir)  # and on missing weights
        quant_config_for(hf_config, config.quantization)  # and on a quantization scheme we cannot serve
        tokenizer = get_tokenizer(config)
        device = shard_device(config)
        on_gpus = device.type == "cuda"
        budget = config.max_num_batched_tokens or (8192 if on_gpus else 2048)
        return cls(config, model_dir, hf_config, tokenizer, eos_token_ids(tokenizer, model_dir), device,
                   shard_dtype(config.dtype, hf_config, device), _max_model_len(config, hf_config), budget,
                   config.resolved_max_num_seqs(on_gpus))

    @property
    def on_gpus(self) -> bool:
        return self.device.type == "cuda"

    def runner_kwargs(self) -> dict:
        return dict(model_dir=self.model_dir, hf_config=self.hf_config, dtype=self.dtype, device=self.device,
                    max_model_len=self.max_model_len, block_size=self.config.block_size, seed=self.config.seed,
                    attention_backend=self.config.attention_backend, enforce_eager=self.config.enforce_eager,
                    max_num_seqs=self.max_num_seqs, custom_all_reduce=not self.config.disable_custom_all_reduce,
                    cpu_threads=self.cpu_threads(), expert_parallel=self.config.enable_expert_parallel,
                    quantization=self.config.quantization, kv_cache_dtype=self.config.kv_cache_dtype)

    def cpu_threads(self) -> int:
        """Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for a Serve replica), which would leave a CPU
        replica's torch on one core; the shards of one engine share the cores instead."""
        c = self.config
        if c.cpu_threads:
            return c.cpu_threads
        return max(1, len(os.sched_getaffinity(0)) // (c.tensor_parallel_size * c.pipeline_parallel_size))

    def make_executor(self) -> Executor:
        c = self.config
        if c.tensor_parallel_size * c.pipeline_parallel_size > 1:
            from engine.executor.ray import RayExecutor  # imports Ray: only when there are workers to start
            return RayExecutor(c, self.runner_kwargs())
        from engine.executor.local import LocalExecutor
        return LocalExecutor(self.runner_kwargs())

    def size_kv_cache(self, executor: Executor) -> int:
        """Blocks that fit every shard's memory budget after a profiling pass at the largest step size (each
        worker measures its own device)."""
        c = self.config
        budgets = executor.profile(self.max_num_batched_tokens, c.gpu_memory_utilization)
        block_bytes = executor.kv_block_bytes()
        if c.num_kv_blocks:
            return c.num_kv_blocks
        if c.kv_cache_memory_bytes:
            budget = c.kv_cache_memory_bytes
        elif all(b is not None for b in budgets):
            budget = min(budgets)
            if budget < block_bytes:
                raise RuntimeError(f"no GPU memory left for the KV cache after loading the model ({budget / 2**30:.2f} "
                                   "GiB): raise gpu_memory_utilization, lower max_num_batched_tokens, or use more GPUs")
        else:
            budget = CPU_KV_CACHE_BYTES
        useful = self.max_num_seqs * -(-self.max_model_len // c.block_size)  # more blocks than this never get used
        return max(1, min(budget // block_bytes, useful))


def shard_device(config: EngineConfig) -> torch.device:
    """The device every shard of the model runs on. device=auto picks CUDA when there are GPUs to run on: this
    process's, or, for a TP x PP replica whose Ray workers hold the shards, the Ray cluster's (a Serve replica of
    several shards holds no GPU itself)."""
    if config.device == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.is_available() or (config.world_size > 1 and _ray_cluster_has_gpus())
    if config.device == "cuda" and not gpus:
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device("cuda" if config.runs_on_gpus(gpus) else "cpu")


def _ray_cluster_has_gpus() -> bool:
    import ray  # only a replica of several shards asks, and it runs on Ray anyway

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def shard_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: on GPUs the checkpoint's dtype (bfloat16 for float32 checkpoints); on CPU bfloat16 for a 16-bit
    checkpoint where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), else float32 (a float32 checkpoint
    stays float32)."""
    if name != "auto":
        return DTYPES[name]
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = DTYPES.get(str(ckpt).removeprefix("torch."), torch.bfloat16)
    if device.type == "cpu":
        return torch.bfloat16 if ckpt != torch.float32 and cpu_has_native_bfloat16() else torch.float32
    return ckpt if ckpt != torch.float32 else torch.bfloat16


def cpu_has_native_bfloat16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _max_model_len(config: EngineConfig, hf_config) -> int:
    model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
    if config.max_model_len and config.max_model_len > model_max:
        raise ValueError(f"max_model_len={config.max_model_len} is above the model's max_position_embeddings "
                         f"({model_max})")
    return config.max_model_len or model_max

"""Engine options: one pydantic model shared by `LLM(...)`, `AsyncEngine`, the CLI and the cluster config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EngineConfig(BaseModel):
    """Everything one engine replica needs to know. Field names match vLLM's engine arguments."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("smollm2-135m-instruct", description="Local HF directory, built-in name, or HF repo id.")
    tokenizer: str | None = Field(None, description="Tokenizer directory (default: the model's).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (CPU ranks) per pipeline stage.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages.")
    enable_expert_parallel: bool = Field(
        False, description="Mixture-of-experts models: each tensor-parallel rank holds whole experts (a share of "
                           "them) instead of a slice of every expert's intermediate dim.")
    pipeline_layer_split: list[int] | None = Field(
        None, description="Decoder layers per pipeline stage (default: balanced by weight bytes, so the last stage, "
                          "which also holds the LM head, takes fewer).")
    placement_strategy: Literal["PACK", "STRICT_PACK"] = Field(
        "PACK", description="Ray placement of the tp x pp workers: PACK may span nodes, STRICT_PACK keeps one node.")
    distributed_init_timeout_s: float = Field(
        120.0, gt=0, description="Seconds for all ranks to join; also bounds every collective and a stuck step.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight/activation dtype; auto = the checkpoint's on CUDA (bfloat16 for float32 "
        "checkpoints); on CPU bfloat16 for a 16-bit checkpoint where the CPU has bfloat16 arithmetic (AVX512-BF16, "
        "AMX), else float32.")
    quantization: Literal["fp8"] | None = Field(
        None, description="Quantize a 16-bit checkpoint while loading: fp8 = FP8 weights with per-channel scales, "
                          "activations per token. A quantized checkpoint's own scheme is read from its config.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto", description="KV-cache storage: auto = the model dtype; fp8 (= fp8_e4m3) halves it, keys and values "
                            "divided by per-tensor scales (the checkpoint's k_scale/v_scale, else 1.0).")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    max_model_len: int | None = Field(None, ge=1, description="Context length cap (default: the model's).")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Most requests in one batch (default: 1024 on GPUs, as vLLM on big GPUs; 256 on CPU).")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget per step (default: 8192 on CUDA, 2048 on CPU).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = CUDA when available.")
    cpu_threads: int | None = Field(
        None, ge=1, description="Torch threads per shard on CPU (default: the cores this process may use, split "
                                "between the tp x pp ranks; Ray would otherwise give a replica one thread).")
    seed: int = Field(0, description="Seed for weights-free randomness (sampling without a per-request seed).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory the engine may use.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV-cache byte budget; default on CPU 1 GiB, on CUDA derived from gpu_memory_utilization.")
    num_kv_blocks: int | None = Field(None, ge=1, description="Force the KV-cache size in blocks (tests, debugging).")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto = Triton on CUDA, torch reference on CPU.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    disable_custom_all_reduce: bool = Field(
        False, description="Tensor parallel on GPUs: NCCL for every all-reduce, not symmetric memory (one-shot "
                           "kernels for small ones, and batch-1 decode's inside its matrix-vector kernels).")
    async_scheduling: bool | None = Field(
        None, description="Schedule and launch step n+1 while step n runs; under pipeline parallelism, each "
                          "micro-batch's next step before its tokens reach the driver. Default: on with CUDA, "
                          "and with pipeline parallelism.")
    engine_core_process: bool | None = Field(
        None, description="AsyncEngine only: run the engine loop (scheduling, the model, detokenization) in a "
                          "process of its own, so it never waits for the GIL of the server streaming its tokens "
                          "(one-device engines; tensor/pipeline parallel ones keep it on a thread). Default: on "
                          "with CUDA, off on CPU (where its cores are the engine's).")
    scheduling_policy: Literal["fcfs", "priority"] = Field("fcfs", description="Order of the waiting queue.")
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(
        None, description="Split the model's <think>...</think> reasoning from its answer into reasoning_content "
                          "(chat), as vLLM's --reasoning-parser: deepseek_r1 (the template opens the reasoning) "
                          "or qwen3 (reasoning only when the output opens with <think>). Structured outputs then "
                          "constrain the answer only, from the </think> on.")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` a request may ask for.")
    revision: str | None = Field(None, description="HF hub revision when `model` is a repo id.")

    def runs_on_gpus(self, gpus_available: bool) -> bool:
        """The device rule, in one place: `cuda` and `cpu` say so; `auto` takes GPUs where there are any."""
        return self.device == "cuda" or (self.device == "auto" and gpus_available)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolved_max_num_seqs(self, on_gpus: bool) -> int:
        return self.max_num_seqs or (1024 if on_gpus else 256)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of two, got {v}")
        return v

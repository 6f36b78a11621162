"""One model shard in this process (tensor_parallel_size = pipeline_parallel_size = 1)."""
from __future__ import annotations

import gc

import torch

from engine.model_runner import LaunchedStep, ModelRunner
from engine.step import BatchInput, StepOutput


class LocalExecutor:
    """The `Executor` whose step handle is the runner's `LaunchedStep`."""

    def __init__(self, runner_kwargs: dict):
        self.runner: ModelRunner | None = ModelRunner(**runner_kwargs)

    @property
    def is_dead(self) -> bool:
        return self.runner is None

    def describe(self) -> dict:
        return self.runner.describe()

    def kv_block_bytes(self) -> int:
        return self.runner.kv_block_bytes()

    def profile(self, num_tokens: int, gpu_memory_utilization: float) -> list[int | None]:
        return [self.runner.profile(num_tokens, gpu_memory_utilization)]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, batch: BatchInput) -> StepOutput:
        return self.runner.execute(batch)

    def execute_async(self, batch: BatchInput) -> LaunchedStep:
        return self.runner.launch(batch)

    def wait(self, handle: LaunchedStep) -> StepOutput:
        return self.runner.finish(handle)

    @property
    def samples_later(self) -> bool:
        return True

    def sample(self, handle: LaunchedStep, token_bitmask) -> None:
        self.runner.sample(handle, token_bitmask)

    def discard(self, handle: LaunchedStep) -> None:
        self.runner.discard(handle)

    def start_profile(self, out_dir: str) -> None:
        self.runner.start_profile(out_dir)

    def stop_profile(self) -> list[str]:
        return [self.runner.stop_profile()]

    def check_health(self) -> None:
        if self.runner is None:
            raise RuntimeError("executor is down: shut down")

    def shutdown(self) -> None:
        """Drop the model, its KV cache and CUDA graphs, and hand their memory back to the device."""
        if self.runner is None:
            return
        on_cuda = self.runner.device.type == "cuda"
        self.runner = None
        gc.collect()  # the model's modules refer to each other: free their tensors now, not at some later collection
        if on_cuda:
            torch.cuda.empty_cache()

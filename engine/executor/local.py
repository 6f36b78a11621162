"""One model shard in this process (tensor_parallel_size = pipeline_parallel_size = 1)."""
from __future__ import annotations

from engine.model_runner import BatchInput, LaunchedStep, ModelRunner, StepOutput


class LocalExecutor:
    def __init__(self, runner_kwargs: dict):
        self.runner = ModelRunner(**runner_kwargs)

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

    def discard(self, handle: LaunchedStep) -> None:
        self.runner.discard(handle)

    def start_profile(self, out_dir: str) -> None:
        self.runner.start_profile(out_dir)

    def stop_profile(self) -> list[str]:
        return [self.runner.stop_profile()]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

"""What the engine core asks of an executor: run steps on the model's shards, and say when it cannot any more.

`LocalExecutor` (one shard in this process) and `RayExecutor` (TP x PP workers) implement it. Steps go in and
come out as the torch-free types of engine/step.py; `execute_async` returns a handle of the executor's own
type, which the core only passes back to `wait` or `discard`."""
from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from engine.step import BatchInput, StepOutput

Handle = TypeVar("Handle")


@runtime_checkable
class Executor(Protocol[Handle]):
    @property
    def is_dead(self) -> bool:
        """No step can run any more: a worker died or got stuck, or the executor was shut down."""

    def describe(self) -> dict:
        """Rank 0's kernels, CUDA graphs, device and dtype."""

    def kv_block_bytes(self) -> int:
        """Bytes one KV-cache block takes on the shard that needs the most."""

    def profile(self, num_tokens: int, gpu_memory_utilization: float) -> list[int | None]:
        """Run the largest step once; each shard's bytes left for its KV cache (None on CPU)."""

    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    def execute(self, batch: BatchInput) -> StepOutput:
        """Run one step and wait for its output."""

    def execute_async(self, batch: BatchInput) -> Handle:
        """Submit one step and return at once; steps run in submission order."""

    def wait(self, handle: Handle) -> StepOutput: ...

    @property
    def samples_later(self) -> bool:
        """Whether a step may be launched before its bitmask is known (`BatchInput.bitmask_later`)."""

    def sample(self, handle: Handle, token_bitmask) -> None:
        """Sample a step launched with `bitmask_later`, with its bitmask (rows as `BatchInput.bitmask_rows`)."""

    def discard(self, handle: Handle) -> None:
        """Wait for a submitted step whose output is dropped (an earlier one failed); its own failure is not
        reported."""

    def start_profile(self, out_dir: str) -> None:
        """Record what every shard's host and device do (torch.profiler) until stop_profile."""

    def stop_profile(self) -> list[str]:
        """The Chrome traces written, one per shard."""

    def check_health(self) -> None:
        """Raise, naming the shard, when one is dead or stuck."""

    def shutdown(self) -> None:
        """Release the shards (workers, placement group, device memory). Safe to call twice."""

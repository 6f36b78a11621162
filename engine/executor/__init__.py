"""Executors run a step's batch on the model's devices: `LocalExecutor` in-process, `RayExecutor` over TP x PP workers."""
from engine.executor.local import LocalExecutor

__all__ = ["LocalExecutor"]

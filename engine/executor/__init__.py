"""Executors run a step's batch on the model's devices: `LocalExecutor` in-process, `RayExecutor` over TP x PP
workers, both to the `Executor` protocol. `ModelSetup.make_executor` picks one."""
from engine.executor.base import Executor

__all__ = ["Executor"]

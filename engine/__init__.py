"""Strata's inference engine: `LLM` for offline batches, `AsyncEngine` for servers."""
from engine.config import EngineConfig
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import CompletionOutput, EngineStats, RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "StreamDelta", "EngineStats", "InvalidRequestError", "EngineDeadError",
           "get_tokenizer", "apply_chat_template"]


def __getattr__(name):  # keep `import engine` light: torch loads only when an engine is built
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine
        return AsyncEngine
    if name in ("get_tokenizer", "apply_chat_template"):
        from engine import tokenizer
        return getattr(tokenizer, name)
    raise AttributeError(name)

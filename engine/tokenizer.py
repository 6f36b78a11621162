"""Tokenizer loading, chat templates and the set of end-of-sequence ids."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.model_source import TOKENIZER_PATTERNS, resolve_model


def get_tokenizer(config: EngineConfig):
    """The tokenizer of the engine `config` describes (`tokenizer`, else the model's), loaded once per process:
    a server that tokenizes in front of an engine in the same process shares the engine's."""
    source = config.tokenizer or config.model
    revision = None if config.tokenizer else config.revision
    return load_tokenizer(resolve_model(source, revision, patterns=TOKENIZER_PATTERNS))


def load_tokenizer(path: Path):
    """The tokenizer in `path`, loaded once per process: an engine and the server in front of it share it."""
    return _load_tokenizer(str(Path(path).resolve()))


@functools.lru_cache(maxsize=None)
def _load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loader failure gets the same fix
        raise ValueError(f"cannot load a tokenizer from {path}: {e}. Pass `tokenizer=` a directory with "
                         "tokenizer.json / tokenizer_config.json") from e
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizers) backend; convert it to tokenizer.json")
    return tok


def eos_token_ids(tokenizer, model_dir: Path) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None, **kwargs) -> list[int]:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use completions, or pass chat_template=")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        chat_template=chat_template, **kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)

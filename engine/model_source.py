"""Turn a model name into a local Hugging Face directory: a built-in model, a local path, or a hub repo id."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from engine.builtin_models import BUILTIN_MODELS, builtin_name

logger = logging.getLogger("strata")

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
TOKENIZER_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt"]  # no weights: for processes that only tokenize


def cache_dir() -> Path:
    """Where built-in models are built: $STRATA_CACHE_DIR, else ~/.cache/strata/models."""
    env = os.environ.get("STRATA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "strata" / "models"


def resolve_model(name_or_path: str, revision: str | None = None, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local HF model directory (config.json, *.safetensors, tokenizer files) for `name_or_path`.

    Built-in names ("demo", "smollm2-135m-instruct", case-insensitive) are built once into `cache_dir()`;
    an existing directory is returned as is; anything else is downloaded from the Hugging Face hub (the files
    matching `patterns`; TOKENIZER_PATTERNS skips the weights).
    """
    name_or_path = str(name_or_path)
    name = builtin_name(name_or_path)
    if name is not None:
        return _build_cached(name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"Model directory {str(path)!r} has no config.json; expected a Hugging Face model "
                             f"directory (config.json, *.safetensors, tokenizer files).")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ValueError(
            f"Model {name_or_path!r} does not exist locally, and downloading it from the Hugging Face hub failed "
            f"({reason}). Pass a local Hugging Face model directory, or one of the built-in models: "
            f"{', '.join(BUILTIN_MODELS)}.") from e


def _build_cached(name: str) -> Path:
    """Build a built-in model into the cache once; safe when several processes ask for it at the same time."""
    from filelock import FileLock

    root = cache_dir()
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if (final / "config.json").is_file():  # another process built it while we waited for the lock
            return final
        # Build next to the final place, then rename: readers only ever see a complete directory.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            logger.info("Building built-in model %r into %s (once; later runs reuse it)...", name, final)
            start = time.perf_counter()
            BUILTIN_MODELS[name](tmp)
            for f in tmp.iterdir():  # safetensors files come out 0600; let other users of a shared cache read them
                f.chmod(0o644)
            if final.exists():  # left over without config.json (e.g. emptied by hand): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            logger.info("Built %r in %.1f s.", name, time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

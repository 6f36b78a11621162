"""Build a model from a Hugging Face directory and stream its safetensors weights into it.

Sharded modules get each tensor as a `CheckpointSlice`, so a tensor-parallel rank reads only its own rows or
columns from the file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig

from engine.layers.quantization import quant_config_for
from engine.models import model_class
from engine.parallel_state import TPGroup

logger = logging.getLogger("strata")


def load_hf_config(model_dir: Path):
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: point `model` at a Hugging Face model directory")
    return AutoConfig.from_pretrained(model_dir)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [f.name for f in files if not f.exists()]
    if not files or missing:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (missing: {missing or '*.safetensors'}); "
                                "save the checkpoint with save_pretrained(..., safe_serialization=True)")
    return files


def load_model(model_dir: Path, hf_config, dtype: torch.dtype, device: torch.device, max_len: int,
               tp: TPGroup | None = None, layer_range: tuple[int, int] | None = None, progress: bool = True):
    arch, cls = model_class(getattr(hf_config, "architectures", None))
    quant_config_for(hf_config)
    with torch.device(device):
        model = cls(hf_config, arch, dtype, max_len, tp=tp, layer_range=layer_range)
    loaded = set()
    files = weight_files(model_dir)
    with tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    target = model.param_for(name)
                    if target is None:
                        continue
                    module, param, shard = target
                    if hasattr(module, "load"):
                        module.load(param, CheckpointSlice(f.get_slice(name), device, dtype), shard)
                    else:
                        param.data.copy_(f.get_tensor(name).to(device=device, dtype=dtype))
                    loaded.add((id(param), shard))
            bar.update(1)
    expected = sum(len(getattr(m, "shard_sizes", {None: 0})) for m in _leaf_param_owners(model))
    if len(loaded) < expected:
        raise ValueError(f"checkpoint {model_dir} is missing weights: loaded {len(loaded)} of {expected} tensors")
    return model.eval()


class CheckpointSlice:
    """A checkpoint tensor not read yet: `narrow` and `[index]` read only that part of the file. Any other torch
    use (`param.copy_(s)`) reads the whole tensor."""

    def __init__(self, handle, device: torch.device, dtype: torch.dtype):
        self.handle, self.device, self.dtype = handle, device, dtype
        self.shape = torch.Size(handle.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self.handle[index].to(device=self.device, dtype=self.dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self[(slice(None),) * dim + (slice(start, start + length),)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def read(a):
            return a[...] if isinstance(a, cls) else a
        return func(*map(read, args), **{k: read(v) for k, v in (kwargs or {}).items()})


def _leaf_param_owners(model):
    """Each distinct parameter's owner, once per parameter (tied weights counted once)."""
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield module

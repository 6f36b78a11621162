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

from engine.layers.quantization import building_with, quant_config_for
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
               tp: TPGroup | None = None, layer_range: tuple[int, int] | None = None, progress: bool = True,
               quantization: str | None = None):
    """`quantization`: online quantization of an unquantized checkpoint (a quantized one says its own)."""
    arch, cls = model_class(getattr(hf_config, "architectures", None))
    with torch.device(device), building_with(quant_config_for(hf_config, quantization)):
        model = cls(hf_config, arch, dtype, max_len, tp=tp, layer_range=layer_range)
    loaded = set()
    files = weight_files(model_dir)
    with tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    target = model.param_for(name)
                    if target is None:
                        _load_kv_cache_scale(model, name, f)
                        continue
                    module, param, shard = target
                    if hasattr(module, "load"):  # quantized weights and scales keep the file's dtype
                        cast = dtype if param.dtype == dtype else None
                        try:
                            module.load(param, CheckpointSlice(f.get_slice(name), device, cast), shard)
                        except ValueError as e:  # a mis-shaped tensor: say which
                            raise ValueError(f"checkpoint {model_dir}: {name}: {e}") from None
                    else:
                        param.data.copy_(f.get_tensor(name).to(device=device, dtype=dtype))
                    loaded.update((id(param), s) for s in _shards_filled(module, shard))
            bar.update(1)
    missing = [what for what, param, shard in _expected_tensors(model) if (id(param), shard) not in loaded]
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing {len(missing)} tensors: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


class CheckpointSlice:
    """A checkpoint tensor not read yet: `narrow` and `[index]` read only that part of the file. Any other torch
    use (`param.copy_(s)`) reads the whole tensor."""

    def __init__(self, handle, device: torch.device, dtype: torch.dtype | None):
        """dtype: what reads are cast to; None keeps the file's (`self.dtype`)."""
        self.handle, self.device = handle, device
        self.shape = torch.Size(handle.get_shape())
        self.dtype = dtype or _SAFETENSORS_DTYPES[handle.get_dtype()]

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, index) -> torch.Tensor:
        return self.handle[index].to(device=self.device, dtype=self.dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self[(slice(None),) * dim + (slice(start, start + length),)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def read(a):
            return a[...] if isinstance(a, cls) else a
        return func(*map(read, args), **{k: read(v) for k, v in (kwargs or {}).items()})


def _load_kv_cache_scale(model, name: str, f) -> None:
    """An FP8 KV cache's per-tensor scales, as llm-compressor writes them (`layers.N.self_attn.k_scale`): onto the
    layer's `attn` (engine/layers/attention.py), on the stage that holds it."""
    module_path, _, scale = name.removeprefix("model.").rpartition(".")
    if scale not in ("k_scale", "v_scale"):
        return
    try:
        attn = model.get_submodule(f"{module_path}.attn")
    except AttributeError:
        return
    setattr(attn, scale, f.get_tensor(name).float().item())


def _shards_filled(module, shard: str | None) -> list[str | None]:
    """A fused checkpoint tensor (shard None on a module of several parts) fills every part."""
    parts = getattr(module, "shard_sizes", None)
    return list(parts) if shard is None and parts else [shard]


def _expected_tensors(model):
    """(the tensor in words, parameter, shard) of each tensor the checkpoint must hold: each distinct parameter
    once (tied weights counted once) per shard of its module, or per checkpoint tensor of a module that lists them
    (`param_shards`: MoE experts, one parameter from many tensors); none for parameters made while loading."""
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or getattr(p, "computed", False):
                continue
            seen.add(id(p))
            if hasattr(module, "param_shards"):
                for shard in module.param_shards(p):
                    yield module.describe_shard(module_name, shard), p, shard
                continue
            for shard in getattr(module, "shard_sizes", {None: 0}):
                yield f"{module_name}.{name}" + (f" ({shard})" if shard else ""), p, shard


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}

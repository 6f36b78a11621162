"""Quantize a 16-bit Hugging Face checkpoint (safetensors, one file or shards) into a format real tools write, by
round-to-nearest (no calibration), one shard at a time, on the GPU when there is one:

    python benchmarks/quantize_checkpoint.py /root/llama3-8b-random /root/llama3-8b-fp8 --format fp8-dynamic

fp8-dynamic: compressed-tensors float-quantized, as llm-compressor's FP8_DYNAMIC scheme writes it: FP8 e4m3
    weights with a float32 scale per output channel (weight_scale [N, 1]), activations quantized per token while
    running (nothing stored for them).
awq: AutoAWQ's GEMM checkpoints: asymmetric 4-bit, zero points, an fp16 scale per `group` input features
    (qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N]; nibbles in the order 0 2 4 6 1 3 5 7).
w4a16: compressed-tensors pack-quantized, symmetric 4-bit stored as q + 8, grouped scales (weight_packed
    [N, K / 8], weight_scale [N, K / G], weight_shape).
Only the decoder's linear layers are quantized; embeddings, norms and lm_head stay as they are."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMATS = ("fp8-dynamic", "awq", "w4a16")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")  # the last two: Phi-3's fused checkpoint tensors
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ int32 holds output column 8c + AWQ_ORDER[i]
INDEX = "model.safetensors.index.json"


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (e4m3 weight, float32 scale: [N, 1] per channel, [1] per tensor)."""
    w = w.float()
    amax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().max().view(1)
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    return fp8(w, scale), scale


def pack_int4(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[R, C] of values in [0, 16) -> int32 [R, C / 8]: int32 column c holds values[:, 8c + order[i]] in nibble i."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)[..., order]
    packed = (v << torch.arange(0, 32, 4, device=v.device)).sum(-1)  # disjoint nibbles: the sum is their OR
    return (packed - (packed >= 2 ** 31).long() * 2 ** 32).to(torch.int32)  # the same 32 bits, as int32


def awq_weight(w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({qweight, qzeros, scales}, dequantized float32 [N, K])."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(groups / scales) + zeros).clamp(0, 15)
    tensors = {"qweight": pack_int4(q.view(n, k).t().contiguous(), AWQ_ORDER),  # [K, N / 8]
               "qzeros": pack_int4(zeros[..., 0].t().contiguous(), AWQ_ORDER),  # [K / G, N / 8]
               "scales": scales[..., 0].t().contiguous().half()}  # [K / G, N]
    return tensors, ((q - zeros) * scales).view(n, k)


def w4a16_weight(w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({weight_packed, weight_scale, weight_shape}, dequantized float32 [N, K])."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    scale = groups.abs().amax(-1, keepdim=True) / 7.5
    q = torch.round(groups / scale).clamp(-8, 7)
    tensors = {"weight_packed": pack_int4((q + 8).view(n, k), list(range(8))),
               "weight_scale": scale[..., 0].contiguous(), "weight_shape": torch.tensor([n, k])}
    return tensors, (q * scale).view(n, k)


def quantize_linear(fmt: str, name: str, w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear layer's checkpoint tensors in `fmt` (named as the checkpoint names them), and its dequantized
    weight."""
    prefix = name.removesuffix("weight")
    if fmt == "fp8-dynamic":
        q, scale = fp8_weight(w, per_channel=True)
        return {name: q, name + "_scale": scale}, q.float() * scale
    n, k = w.shape
    if k % group or (fmt == "awq" and n % 8) or k % 8:
        raise ValueError(f"{name} [{n}, {k}] does not split into {group}-wide groups packed 8 to an int32")
    tensors, dequantized = (awq_weight if fmt == "awq" else w4a16_weight)(w, group)
    return {prefix + key: t for key, t in tensors.items()}, dequantized


def compressed_tensors_config(fmt: str, weights: dict, input_activations: dict | None) -> dict:
    """quantization_config of an llm-compressor checkpoint with one config group over the Linear layers."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": input_activations}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None, "config_groups": {"group_0": group}}


def fp8_config(weights: str, activations: str | None) -> dict:
    """weights: channel | tensor; activations: token (dynamic) | tensor (static) | None (W8A16)."""
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    act = None if activations is None else dict(args, strategy=activations, dynamic=activations == "token")
    return compressed_tensors_config("float-quantized", dict(args, strategy=weights, dynamic=False), act)


def quantization_config(fmt: str, group: int) -> dict:
    if fmt == "fp8-dynamic":
        return fp8_config("channel", "token")
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None}
    return compressed_tensors_config("pack-quantized", weights, None)


def shard_names(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        return sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(f"{src} holds neither model.safetensors nor {INDEX}")


def quantize_checkpoint(src: Path, dst: Path, fmt: str, group: int = 128, device: str | None = None,
                        dequantized: dict | None = None, log=print) -> Path:
    """Write src quantized as `fmt` into dst (a new directory): the same shards, one read, quantized and written
    before the next. `dequantized`: a dict to fill with every tensor as the quantized checkpoint means it
    (float32 on the CPU; for references in tests)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    shards = shard_names(src)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    if dst.exists():
        raise ValueError(f"{dst} exists; quantize into a new directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = dst.with_name(dst.name + ".partial")  # renamed when whole, so a killed run leaves no half checkpoint
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():  # config, tokenizer, generation config
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX:
            shutil.copy2(f, tmp / f.name)
    try:
        weight_map = _quantize_shards(src, tmp, shards, fmt, group, device, dequantized, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (src / INDEX).is_file():
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config["quantization_config"] = quantization_config(fmt, group)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(dst)
    return dst


def _quantize_shards(src: Path, dst: Path, shards: list[str], fmt: str, group: int, device: str,
                     dequantized: dict | None, log) -> dict[str, str]:
    weight_map, t_all = {}, time.perf_counter()
    for i, shard in enumerate(shards, 1):
        t0, out, linears = time.perf_counter(), {}, 0
        for name, w in load_file(str(src / shard)).items():
            if not is_linear_weight(name):
                out[name] = w
                if dequantized is not None:
                    dequantized[name] = w
                continue
            tensors, deq = quantize_linear(fmt, name, w.to(device), group)
            out.update({k: t.cpu() for k, t in tensors.items()})
            if dequantized is not None:
                dequantized[name] = deq.cpu()
            linears += 1
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
        log(f"[{i}/{len(shards)}] {shard}: {linears} linear layers quantized, {len(out)} tensors written in "
            f"{time.perf_counter() - t0:.1f} s", flush=True)
    log(f"{fmt}: {len(shards)} shards in {time.perf_counter() - t_all:.1f} s on {device}", flush=True)
    return weight_map


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a 16-bit checkpoint directory")
    ap.add_argument("dst", type=Path, help="the quantized checkpoint's directory (must not exist)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--group", type=int, default=128, help="input features to a scale (INT4 formats)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    args = ap.parse_args(argv)
    try:
        return quantize_checkpoint(args.src, args.dst, args.format, args.group, args.device)
    except (ValueError, OSError) as e:
        sys.exit(f"quantize_checkpoint: {e}")


if __name__ == "__main__":
    main()

"""Quantized checkpoints built from the tiny random models, in the formats real tools write, each with its
reference: the same weights dequantized in a plain checkpoint, run by transformers with each linear layer's input
quantized and dequantized the way the scheme quantizes activations (written here, apart from the engine's code).
The weights are quantized by benchmarks/quantize_checkpoint.py, which writes the GPU benchmark's checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from benchmarks.quantize_checkpoint import FP8_MAX, LINEARS, fp8, fp8_config, fp8_weight, is_linear_weight, \
    quantize_checkpoint
from tests.support.prompts import random_prompts

__all__ = ["FP8_MAX", "fp8", "is_linear_weight"]  # the tests use them from here


def write_checkpoint(src: Path, dst: Path, tensors: dict, quantization_config: dict | None) -> Path:
    """src's config and tokenizer with `tensors` as its weights."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def calibrated_input_scales(src: Path) -> dict[str, float]:
    """Static per-tensor activation scales, as llm-compressor calibrates them: each linear input's amax / 448 over
    a few prompts (q/k/v and gate/up see the same input, so they get the same scale)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    amax: dict[str, float] = {}

    def hook(name):
        return lambda _m, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    for name, m in model.named_modules():
        if name.split(".")[-1] in LINEARS:
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for p in random_prompts(seed=7):
            model(torch.tensor([p]))
    return {name: a / FP8_MAX for name, a in amax.items()}


def fp8_compressed_tensors(src: Path, dst: Path, weights: str, activations: str | None) -> tuple[Path, dict]:
    """An llm-compressor FP8 checkpoint (compressed-tensors, float-quantized). weights: channel | tensor;
    activations: token (dynamic) | tensor (static, calibrated) | None (W8A16). Returns (checkpoint, dequantized
    weights)."""
    tensors, out, dequantized = load_file(str(src / "model.safetensors")), {}, {}
    scales = calibrated_input_scales(src) if activations == "tensor" else {}
    for name, w in tensors.items():
        if not is_linear_weight(name):
            out[name] = dequantized[name] = w
            continue
        out[name], out[name + "_scale"] = fp8_weight(w, weights == "channel")  # scale [N, 1] or [1]
        dequantized[name] = out[name].float() * out[name + "_scale"]
        if activations == "tensor":
            out[name.removesuffix("weight") + "input_scale"] = torch.tensor([scales[name.removesuffix(".weight")]])
    return write_checkpoint(src, dst, out, fp8_config(weights, activations)), dequantized


def fp8_block_wise(src: Path, dst: Path, block: tuple[int, int]) -> tuple[Path, dict]:
    """A DeepSeek-V3 / Qwen3-FP8 style checkpoint: quant_method fp8, weight_block_size, weight_scale_inv."""
    tensors, out, dequantized = load_file(str(src / "model.safetensors")), {}, {}
    bn, bk = block
    for name, w in tensors.items():
        if not is_linear_weight(name):
            out[name] = dequantized[name] = w
            continue
        n, k = w.shape
        padded = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
        blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        scale = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp(min=1e-12)
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
        out[name] = fp8(w, full)
        out[name + "_scale_inv"] = scale
        dequantized[name] = out[name].float() * full
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return write_checkpoint(src, dst, out, qc), dequantized


def reference_model(src: Path, dst: Path, dequantized: dict, activations: str | None,
                    input_scales: dict | None = None, group: int | None = None):
    """transformers on the dequantized weights, each linear input quantized as the scheme says: per token,
    per tensor with `input_scales` (checkpoint names), or per `group` columns of a token."""
    write_checkpoint(src, dst, dequantized, None)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()

    def fake_quant(name):
        def hook(_m, args):
            x = args[0]
            if activations == "token":
                scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1 / (FP8_MAX * 512))
            elif activations == "tensor":
                scale = input_scales[name]
            else:
                groups = x.unflatten(-1, (-1, group))
                scale = (groups.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1 / (FP8_MAX * 512))
                return (fp8(groups, scale).float() * scale).flatten(-2)
            return fp8(x, scale).float() * scale
        return hook

    if activations is not None:
        for name, m in model.named_modules():
            if name.split(".")[-1] in LINEARS:
                m.register_forward_pre_hook(fake_quant(name))
    return model


def awq(src: Path, dst: Path, group: int) -> tuple[Path, dict]:
    """An AutoAWQ GEMM checkpoint: asymmetric 4-bit with zero points, `group` input features to a scale."""
    dequantized = {}
    return quantize_checkpoint(src, dst, "awq", group, "cpu", dequantized, log=_quiet), dequantized


def w4a16_compressed_tensors(src: Path, dst: Path, group: int) -> tuple[Path, dict]:
    """An llm-compressor W4A16 checkpoint (pack-quantized): symmetric 4-bit, stored as q + 8, grouped scales."""
    dequantized = {}
    return quantize_checkpoint(src, dst, "w4a16", group, "cpu", dequantized, log=_quiet), dequantized


def _quiet(*_args, **_kwargs):
    pass

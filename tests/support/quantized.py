"""Quantized checkpoints built from the tiny random models, in the formats real tools write, each with its
reference: the same weights dequantized in a plain checkpoint, run by transformers with each linear layer's input
quantized and dequantized the way the scheme quantizes activations (written here, apart from the engine's code)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.support.prompts import random_prompts

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")  # the last two: Phi-3's fused checkpoint tensors
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def write_checkpoint(src: Path, dst: Path, tensors: dict, quantization_config: dict | None) -> Path:
    """src's config and tokenizer with `tensors` as its weights."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


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
        amax = w.abs().amax(1, keepdim=True) if weights == "channel" else w.abs().max().view(1)
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        out[name] = fp8(w, scale)
        out[name + "_scale"] = scale  # weight_scale: [N, 1] per channel, [1] per tensor
        dequantized[name] = out[name].float() * scale
        if activations == "tensor":
            out[name.removesuffix("weight") + "input_scale"] = torch.tensor([scales[name.removesuffix(".weight")]])
    fmt = {"num_bits": 8, "type": "float", "symmetric": True}
    act = None if activations is None else dict(fmt, strategy=activations, dynamic=activations == "token")
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(fmt, strategy=weights, dynamic=False),
                                        "input_activations": act}}}
    return write_checkpoint(src, dst, out, qc), dequantized


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


def _pack_columns(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """AutoAWQ's and compressed-tensors' packing loops: int32 column c holds values[:, 8c + order[i]] in nibble i."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for c in range(packed.shape[1]):
        for i, j in enumerate(order):
            packed[:, c] |= values[:, 8 * c + j].to(torch.int64) << (4 * i)
    return packed.to(torch.uint32).view(torch.int32)


def awq(src: Path, dst: Path, group: int) -> tuple[Path, dict]:
    """An AutoAWQ GEMM checkpoint: asymmetric 4-bit with zero points, `group` input features to a scale."""
    tensors, out, dequantized = load_file(str(src / "model.safetensors")), {}, {}
    for name, w in tensors.items():
        if not is_linear_weight(name):
            out[name] = dequantized[name] = w
            continue
        n, k = w.shape
        groups = w.view(n, k // group, group)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()
        zeros = (-torch.round(lo / scales)).clamp(0, 15)
        q = (torch.round(groups / scales) + zeros).clamp(0, 15)
        dequantized[name] = ((q - zeros) * scales).view(n, k)
        prefix = name.removesuffix("weight")
        awq_order = [0, 2, 4, 6, 1, 3, 5, 7]
        out[prefix + "qweight"] = _pack_columns(q.view(n, k).t().contiguous(), awq_order)  # [K, N / 8]
        out[prefix + "qzeros"] = _pack_columns(zeros[..., 0].t().contiguous(), awq_order)  # [K / G, N / 8]
        out[prefix + "scales"] = scales[..., 0].t().contiguous().half()  # [K / G, N]
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return write_checkpoint(src, dst, out, qc), dequantized


def w4a16_compressed_tensors(src: Path, dst: Path, group: int) -> tuple[Path, dict]:
    """An llm-compressor W4A16 checkpoint (pack-quantized): symmetric 4-bit, stored as q + 8, grouped scales."""
    tensors, out, dequantized = load_file(str(src / "model.safetensors")), {}, {}
    for name, w in tensors.items():
        if not is_linear_weight(name):
            out[name] = dequantized[name] = w
            continue
        n, k = w.shape
        groups = w.view(n, k // group, group)
        scale = groups.abs().amax(-1, keepdim=True) / 7.5
        q = torch.round(groups / scale).clamp(-8, 7)
        dequantized[name] = (q * scale).view(n, k)
        out[name.removesuffix("weight") + "weight_packed"] = _pack_columns((q + 8).view(n, k), list(range(8)))
        out[name + "_scale"] = scale[..., 0].contiguous()
        out[name + "_shape"] = torch.tensor([n, k])
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}
    return write_checkpoint(src, dst, out, qc), dequantized

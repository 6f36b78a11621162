"""benchmarks/make_random_model.py --format writes each shard quantized (a 70B model's 16-bit copy does not fit on
a GPU machine's disk): the same tensors and config as writing it in bf16 and quantizing that with
benchmarks/quantize_checkpoint.py, and the engine serves it."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.quantize_checkpoint import quantize_checkpoint
from engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _make(out: Path, *flags: str) -> None:
    done = subprocess.run([sys.executable, "benchmarks/make_random_model.py", "--shape", "tiny", "--out", str(out),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in sorted(path.glob("*.safetensors")) for name, t in load_file(str(shard)).items()}


def test_fp8_written_directly_equals_bf16_then_quantized(tmp_path):
    _make(tmp_path / "bf16")
    _make(tmp_path / "fp8", "--format", "fp8-dynamic")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8-after", "fp8-dynamic", device="cpu",
                        log=lambda *a, **k: None)
    direct, after = _tensors(tmp_path / "fp8"), _tensors(tmp_path / "fp8-after")
    assert direct.keys() == after.keys() and any(t.dtype == torch.float8_e4m3fn for t in direct.values())
    for name, t in after.items():
        assert torch.equal(direct[name].view(torch.uint8) if t.dtype.itemsize == 1 else direct[name],
                           t.view(torch.uint8) if t.dtype.itemsize == 1 else t), name
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "fp8-after" / "config.json").read_text())[
        "quantization_config"]
    out = LLM(str(tmp_path / "fp8"), device="cpu").generate([[5, 9, 200]], SamplingParams(max_tokens=4,
                                                                                      ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4

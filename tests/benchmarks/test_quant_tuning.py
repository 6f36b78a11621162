"""benchmarks/quant_tuning.py --model tunes the matrix-vector tiles for a checkpoint's own projection shapes: they
must be the shapes its weights have (N rows of K), the fused q/k/v and gate/up ones as the engine packs them. A run
that tunes some row counts keeps the file's entries for the others."""
import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.quant_tuning import model_shapes, write_tiles

ROOT = Path(__file__).resolve().parents[2]


def test_model_shapes_are_the_checkpoints_projection_shapes(tmp_path):
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "benchmarks/make_random_model.py", "--shape", "tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tensors = {name: t.shape for shard in out.glob("*.safetensors") for name, t in load_file(str(shard)).items()}
    layer = "model.layers.0."
    rows = lambda *names: sum(tensors[layer + n + ".weight"][0] for n in names)  # noqa: E731
    expected = {
        "qkv": (rows("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                tensors[layer + "self_attn.q_proj.weight"][1]),
        "o": tuple(tensors[layer + "self_attn.o_proj.weight"]),
        "gate_up": (rows("mlp.gate_proj", "mlp.up_proj"), tensors[layer + "mlp.gate_proj.weight"][1]),
        "down": tuple(tensors[layer + "mlp.down_proj.weight"]),
        "lm_head": tuple(tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])),
    }
    assert model_shapes(out) == {f"{name}@tiny": tuple(shape) for name, shape in expected.items()}


def test_a_run_for_some_row_counts_keeps_the_others(tmp_path):
    path = tmp_path / "configs" / "N=64,K=128,device_name=X,dtype=fp8_w8a8.json"
    tile = lambda m, n: {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": 128, "num_warps": 4,  # noqa: E731
                         "num_stages": 3}
    write_tiles(path, {"1": tile(1, 8), "16": tile(16, 64), "4096": tile(128, 64)})
    write_tiles(path, {"256": tile(64, 64), "1": tile(1, 16)})
    assert json.loads(path.read_text()) == {"1": tile(1, 16), "16": tile(16, 64), "256": tile(64, 64),
                                            "4096": tile(128, 64)}
    assert list(json.loads(path.read_text())) == ["1", "16", "256", "4096"]

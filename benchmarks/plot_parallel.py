"""Plot the two-GPU runs: batch-1 decode latency and W3 throughput of TP=1, TP=2, PP=2 and two TP=1 replicas.

    python benchmarks/plot_parallel.py --tp1 A.json --tp2 B.json --pp2 C.json --replicas D.json --out parallel.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("tp1", "tp2", "pp2", "replicas"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: json.loads(getattr(args, k).read_text()) for k in ("tp1", "tp2", "pp2", "replicas")}
    labels = {k: v + f"\n{runs[k]['commit']}" for k, v in
              {"tp1": "TP=1\n(1 GPU)", "tp2": "TP=2", "pp2": "PP=2", "replicas": "2 x TP=1\nreplicas"}.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    w1 = {k: runs[k]["figures"]["W1"]["ms_per_token"] for k in ("tp1", "tp2", "pp2")}
    left.bar([labels[k] for k in w1], list(w1.values()), color="tab:blue")
    left.axhline(w1["tp1"] / 1.6, color="tab:red", linestyle="--", label="target: TP=1 / 1.6")
    left.set_title("W1 batch-1 decode, ms per token (lower is better)")
    left.legend(loc="lower left", framealpha=0.9)
    w3 = {k: runs[k]["figures"]["W3"]["output_tok_s"] for k in runs}
    right.bar([labels[k] for k in w3], list(w3.values()), color="tab:blue")
    right.axhline(0.85 * w3["replicas"], color="tab:red", linestyle="--", label="target: PP=2 at 85% of 2 x TP=1")
    right.set_title("W3 output tokens/s")
    right.legend(loc="lower left", framealpha=0.9)
    for ax, values in ((left, w1), (right, w3)):
        for i, v in enumerate(values.values()):
            ax.text(i, v, f"{v:,.1f}" if v < 100 else f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{runs['tp1']['device']} x2, Llama-3-8B-shaped bf16 (commit under each bar)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return args.out


if __name__ == "__main__":
    print(main())

"""Our copy of the shared workloads draws exactly the prompts of shared/bench/workloads.py."""
import importlib.util

import pytest

from benchmarks.workloads import WORKLOADS
from tests.support.paths import ROOT

SHARED = ROOT.parent / "shared" / "bench" / "workloads.py"


def load_shared():
    spec = importlib.util.spec_from_file_location("shared_workloads", SHARED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["W1", "W2", "W3"])
def test_workloads_match_the_shared_file(name):
    assert SHARED.exists(), f"{SHARED} is missing: CI clones the repo with shared/ beside it"
    assert WORKLOADS[name]() == load_shared().WORKLOADS[name]()


def test_throughput_benchmark_runs_on_cpu(tmp_path):
    from benchmarks.throughput import main

    figures = main(["--model", "demo", "--device", "cpu", "--workloads", "W1", "W3", "--limit", "24",
                    "--hf-baseline", "4", "--hf-batch-size", "4", "--out-dir", str(tmp_path)])
    assert figures["W3"]["output_tokens"] > 0 and figures["W3"]["transformers"]["output_tokens"] > 0
    assert len(list(tmp_path.glob("throughput-*.json"))) == 1

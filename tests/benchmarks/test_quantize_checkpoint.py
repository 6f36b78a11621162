"""benchmarks/quantize_checkpoint.py, as the GPU benchmark runs it, on a tiny Llama saved in shards: each format
loads in the engine and decodes greedily as transformers does on the dequantized weights (FP8: with each linear
input quantized per token); shard by shard it writes what quantizing the model in one piece writes."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.quantize_checkpoint import FORMATS, INDEX, main, quantize_checkpoint
from engine import LLM
from tests.engine.test_quantized_models import assert_matches
from tests.support import quantized
from tests.support.checkpoints import make_tiny_model
from tests.support.prompts import random_prompts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(one-file checkpoint, the same in two shards with an index, as big checkpoints are saved)."""
    src = make_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama")
    sharded = tmp_path_factory.mktemp("models") / "llama-sharded"
    shutil.copytree(src, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors, weight_map = load_file(str(src / "model.safetensors")), {}
    for shard, names in (("model-00001-of-00002.safetensors", [n for n in tensors if ".layers.0." in n or
                                                                  "embed" in n]),
                         ("model-00002-of-00002.safetensors", [n for n in tensors if not (".layers.0." in n or
                                                                                          "embed" in n)])):
        save_file({n: tensors[n] for n in names}, str(sharded / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, shard)
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, sharded


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_shards_load_and_match_the_dequantized_model(llama, tmp_path, capsys, fmt):
    src, sharded = llama
    path = main([str(sharded), str(tmp_path / fmt), "--format", fmt, "--group", "32"])
    progress = capsys.readouterr().out
    assert "[1/2] model-00001-of-00002.safetensors: 7 linear layers quantized" in progress
    assert "[2/2] model-00002-of-00002.safetensors: 7 linear layers quantized" in progress
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    assert set(weight_map.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}

    dequantized = {}
    whole = quantize_checkpoint(src, tmp_path / "whole", fmt, 32, dequantized=dequantized, log=lambda *a, **k: None)
    expected = load_file(str(whole / "model.safetensors"))
    assert set(weight_map) == set(expected)
    for shard in set(weight_map.values()):
        for name, t in load_file(str(path / shard)).items():
            assert weight_map[name] == shard and torch.equal(t.view(torch.uint8), expected[name].view(torch.uint8))

    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, "token" if fmt == "fp8-dynamic" else None)
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)


def test_bad_input_fails_clearly_and_leaves_no_partial_checkpoint(llama, tmp_path, capsys):
    src, _ = llama
    with pytest.raises(SystemExit, match=r"does not split into 128-wide groups"):  # the tiny layers are 64 wide
        main([str(src), str(tmp_path / "awq"), "--format", "awq"])
    assert list(tmp_path.iterdir()) == []
    fp8 = main([str(src), str(tmp_path / "fp8"), "--format", "fp8-dynamic"])
    with pytest.raises(SystemExit, match=r"fp8 exists; quantize into a new directory"):
        main([str(src), str(fp8), "--format", "fp8-dynamic"])
    with pytest.raises(SystemExit, match=r"is already quantized \(compressed-tensors\)"):
        main([str(fp8), str(tmp_path / "again"), "--format", "w4a16"])
    with pytest.raises(SystemExit, match=r"holds neither model.safetensors nor"):
        main([str(tmp_path / "none"), str(tmp_path / "x"), "--format", "w4a16"])

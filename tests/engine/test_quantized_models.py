"""Quantized checkpoints: built here from tiny random models in each format the engine serves, compared with the
same checkpoint dequantized; schemes the engine does not serve fail at load."""
import json
import shutil

import pytest

from engine import LLM


def with_quantization_config(src, dst, qc: dict):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("qc, named", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
])
def test_unsupported_quantization_fails_at_load_naming_the_scheme(tiny_model_dir, tmp_path, qc, named):
    path = with_quantization_config(tiny_model_dir("llama"), tmp_path / "model", qc)
    with pytest.raises(ValueError, match=rf"quantization {named}.* not supported; supported: "):
        LLM(str(path))

"""The rotary cos/sin cache lands on the device the model is built on, for every rope type (a real Llama-3
checkpoint's llama3 scaling once mixed a CUDA arange with transformers' CPU inverse frequencies)."""
import pytest
import torch

from engine.layers.rotary import RotaryEmbedding
from tests.support.checkpoints import COMMON, CONFIGS


@pytest.mark.parametrize("kind", ["llama", "llama_tied_mha"])  # llama3 scaling, default rope
def test_rotary_cache_is_built_on_the_default_device(kind):
    config_cls, _, extra = CONFIGS[kind]
    config = config_cls(**COMMON, **extra)
    reference = RotaryEmbedding(config, 16, 64).cos_sin_cache
    with torch.device("meta"):  # stands in for torch.device("cuda") without a GPU
        rope = RotaryEmbedding(config, 16, 64)
    assert rope.cos_sin_cache.device.type == "meta"
    assert rope.cos_sin_cache.shape == reference.shape == (64, 16)

"""Tuned tile files of the quantized matmuls: vLLM's names and keys, read back, and the entry chosen for a row
count comes from the same form (matrix-vector up to MAX_GEMV_ROWS rows, one for FP8; tensor-core tiles above)."""
import json

from engine.kernels import quant_tile_configs
from engine.kernels.quant_tile_configs import TileConfig, config_file_name, default_config, nearest_entry


def test_file_names_follow_vllm():
    assert config_file_name(28672, 4096, "fp8_w8a8", "NVIDIA H100 80GB HBM3") == \
        "N=28672,K=4096,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    assert config_file_name(4096, 7168, "fp8_w8a8", "NVIDIA H200", (128, 128)) == \
        "N=4096,K=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"


def test_a_tuned_file_is_read_back(tmp_path, monkeypatch):
    entries = {"1": TileConfig(1, 4, 1024, 4, 2).as_vllm(), "64": TileConfig(64, 128, 128, 8, 4).as_vllm()}
    assert set(entries["64"]) == {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages"}
    (tmp_path / config_file_name(6144, 4096, "int4_w4a16", "GPU X")).write_text(json.dumps(entries))
    monkeypatch.setattr(quant_tile_configs, "CONFIG_DIR", tmp_path)
    quant_tile_configs.tuned_configs.cache_clear()
    try:
        assert quant_tile_configs.tuned_configs(6144, 4096, "int4_w4a16", "GPU X") == \
            {1: TileConfig(1, 4, 1024, 4, 2), 64: TileConfig(64, 128, 128, 8, 4)}
        assert quant_tile_configs.tuned_configs(6144, 4096, "fp8_w8a8", "GPU X") is None
    finally:
        quant_tile_configs.tuned_configs.cache_clear()


def test_the_nearest_entry_of_the_same_form():
    tuned = {1: TileConfig(1, 4, 1024), 8: TileConfig(8, 8, 512), 16: TileConfig(16, 64, 128),
             256: TileConfig(128, 64, 128)}
    assert nearest_entry(tuned, 3, "int4_w4a16") == tuned[1]
    assert nearest_entry(tuned, 9, "int4_w4a16") == tuned[16]  # 8 is nearer, but its tiles are the gemv form's
    assert nearest_entry(tuned, 100, "int4_w4a16") == tuned[16]
    assert nearest_entry(tuned, 200, "int4_w4a16") == tuned[256]
    assert nearest_entry({1: tuned[1]}, 32, "int4_w4a16") is None and nearest_entry(None, 1, "int4_w4a16") is None
    assert default_config(32, 4096, "fp8_w8a8").block_m == 64 and default_config(4, 4096, "int4_w4a16").block_m == 4


def test_fp8_takes_the_matrix_vector_form_for_one_row_only():
    """2 to 8 rows of FP8 take 16-row tensor-core tiles (by default, and from a tuned file's 16-row entry), never a
    one-row entry's matrix-vector tiles."""
    tuned = {1: TileConfig(1, 8, 1024), 16: TileConfig(16, 64, 256, 8, 4), 256: TileConfig(128, 64, 128)}
    assert nearest_entry(tuned, 1, "fp8_w8a8") == tuned[1]
    assert all(nearest_entry(tuned, m, "fp8_w8a8") == tuned[16] for m in range(2, 9))
    assert default_config(1, 4096, "fp8_w8a8").block_m == 1
    assert all(default_config(m, k, "fp8_w8a8").block_m == 16 for m in range(2, 9) for k in (4096, 14336))


def test_an_entry_that_runs_the_norm_apart_keeps_that_through_the_file_format():
    """A 16-bit gemv entry may say the RMSNorm before it runs as a kernel of its own (fold_norm false); entries
    without the key, vLLM's among them, fold it in."""
    apart = TileConfig(1, 8, 2048, 4, 3, fold_norm=False)
    assert apart.as_vllm()["fold_norm"] is False and TileConfig.from_vllm(apart.as_vllm()) == apart
    folded = TileConfig(1, 8, 2048, 4, 3)
    assert "fold_norm" not in folded.as_vllm() and TileConfig.from_vllm(folded.as_vllm()).fold_norm

"""The `strata` command: flags generated from the config schema, Serve YAML rendering, one-line errors (exit 2),
and `strata deploy` / `strata status` against the test session's Ray cluster."""
from __future__ import annotations

import logging

import httpx
import pytest
import yaml

from cluster.cli import build_parser, config_from_args
from cluster.config import ClusterConfig, ModelConfig
from cluster.serve_env import ServeLevelFilter, ray_log_level
from tests.support.cli import strata


def parse(*args: str) -> ClusterConfig:
    return config_from_args(build_parser().parse_args(["config", "render", *args]))


def test_every_config_key_is_a_flag():
    help_text = strata("serve", "--help").stdout
    for key in [*ModelConfig.model_fields, "host", "port", "routing", "api_keys", "max_request_bytes", "max_n"]:
        if key != "model":
            assert "--" + key.replace("_", "-") in help_text, key
    assert "--tp" in help_text and "--pp" in help_text


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"models": [{"model": "demo", "block_size": 32, "max_replicas": 3}],
                                    "routing": "power_of_two", "http": {"port": 9100}}))
    config = parse("--config", str(path), "--block-size", "64", "--tp", "2", "--port", "9200", "--api-key", "a",
                   "--api-key", "b", "--no-enable-prefix-caching")
    model = config.models[0]
    assert (model.model, model.block_size, model.max_replicas, model.tensor_parallel_size) == ("demo", 64, 3, 2)
    assert model.enable_prefix_caching is False
    assert (config.routing, config.http.port, config.api_keys) == ("power_of_two", 9200, ["a", "b"])


def test_no_model_means_the_builtin_default():
    assert parse().models[0].model == "smollm2-135m-instruct"


def test_render_prints_a_serve_config_whose_args_are_the_cluster_config():
    out = strata("config", "render", "demo", "--min-replicas", "0", "--max-replicas", "4", "--port", "9300")
    assert out.returncode == 0, out.stderr
    serve_config = yaml.safe_load(out.stdout)
    assert serve_config["http_options"]["port"] == 9300
    app = serve_config["applications"][0]
    assert app["import_path"] == "cluster.app:build_app" and app["route_prefix"] == "/"
    config = ClusterConfig.model_validate(app["args"])
    assert (config.models[0].model, config.models[0].min_replicas, config.models[0].max_replicas) == ("demo", 0, 4)


@pytest.mark.parametrize("args", [
    ["serve", "--tp", "abc"],
    ["config", "render", "--block-size", "3"],
    ["config", "render", "--config", "/no/such/file.yaml"],
    ["config", "render", "--min-replicas", "3", "--max-replicas", "1"],
    ["config", "render", "--routing", "round_robin"],
    ["serve", "./no/such/model/dir"],
    ["serve", "--log-level", "verbose"],
    ["frobnicate"],
])
def test_bad_input_is_one_line_and_exit_code_2(args):
    out = strata(*args)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_serves_log_filter_keeps_warnings_and_the_access_log_below_debug():
    def record(level: int, **extra) -> logging.LogRecord:
        made = logging.LogRecord("ray.serve", level, __file__, 1, "message", None, None)
        made.__dict__.update(extra)
        return made

    at_info, at_debug = ServeLevelFilter(ray_log_level("info")), ServeLevelFilter(ray_log_level("debug"))
    assert not at_info.filter(record(logging.INFO)) and at_debug.filter(record(logging.INFO))
    assert at_info.filter(record(logging.WARNING)) and at_info.filter(record(logging.INFO, serve_access_log=True))
    assert not ServeLevelFilter(ray_log_level("error")).filter(record(logging.WARNING))


def test_model_flags_need_a_single_model_config(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"models": [{"model": "demo"}, {"model": "demo", "name": "other"}]}))
    out = strata("config", "render", "--config", str(path), "--tp", "2")
    assert out.returncode == 2 and "apply to one model" in out.stderr


def test_deploy_a_rendered_config_then_status(serve_url, tmp_path):
    import ray
    from ray import serve

    rendered = strata("config", "render", "demo", "--name", "cli-demo", "--num-kv-blocks", "128", "--app-name",
                      "strata-cli")
    path = tmp_path / "serve.yaml"
    path.write_text(rendered.stdout)
    address = ray.get_runtime_context().gcs_address
    try:
        out = strata("deploy", str(path), "--address", address, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "cli-demo" in out.stdout
        r = httpx.post(f"{serve_url}/v1/completions", json={"model": "cli-demo", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        status = strata("status", "--address", address, "--app-name", "strata-cli")
        assert status.returncode == 0, status.stderr[-2000:]
        assert "cli-demo" in status.stdout and "RUNNING" in status.stdout
    finally:
        serve.delete("strata-cli")

"""ClusterConfig: YAML loading, validation, the engine options split, and replica placement bundles."""
from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from cluster.app import INGRESS_NAME, autoscaling_config, build_app, engine_deployment, replica_resources
from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from engine import EngineConfig


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"model": "demo", "name": "a", "tensor_parallel_size": 2, "min_replicas": 0, "max_replicas": 4},
                   {"model": "smollm2-135m-instruct"}],
        "routing": "power_of_two", "http": {"host": "0.0.0.0", "port": 9000}, "api_keys": ["k"],
        "limits": {"max_n": 2}}))
    config = ClusterConfig.from_yaml(path)
    assert [m.served_name for m in config.models] == ["a", "smollm2-135m-instruct"]
    assert config.model("a").world_size == 2 and config.http.port == 9000 and config.limits.max_n == 2
    engine = config.models[0].engine_config()
    assert isinstance(engine, EngineConfig) and engine.tensor_parallel_size == 2 and engine.model == "demo"


@pytest.mark.parametrize("data", [
    {"models": [{"model": "demo", "min_replicas": 3, "max_replicas": 2}]},
    {"models": [{"model": "demo"}, {"model": "demo"}]},  # same served name twice
    {"models": [{"model": "demo", "block_size": 24}]},  # an engine option, validated by EngineConfig
    {"models": [{"model": "demo", "no_such_key": 1}]},
    {"routing": "random"},
    {"models": []},
    {"engine_in_ingress": True, "models": [{"model": "demo"}, {"model": "demo", "name": "b"}]},
    {"engine_in_ingress": True, "models": [{"model": "demo", "max_replicas": 2}]},
    {"engine_in_ingress": True, "ingress_replicas": 2},
])
def test_invalid_configs_are_rejected(data):
    with pytest.raises(ValidationError):
        ClusterConfig.model_validate(data)


def test_deployment_names_are_safe():
    assert engine_deployment_name("org/model:v1") == "EngineReplica-org-model-v1"


def test_placement_bundles_hold_one_shard_each_and_the_replica_in_the_first():
    m = ModelConfig(model="demo", tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_replica=2)
    actor, bundles, strategy = replica_resources(m, gpu=True)
    assert bundles == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert actor == {"num_cpus": 2.0, "num_gpus": 0} and strategy == "PACK"
    actor, bundles, _ = replica_resources(ModelConfig(model="demo", tensor_parallel_size=2), gpu=False)
    assert bundles == [{"CPU": 2.0}, {"CPU": 1.0}]
    actor, bundles, strategy = replica_resources(ModelConfig(model="demo"), gpu=True)
    assert bundles == [{"CPU": 1.0, "GPU": 1.0}] and actor["num_gpus"] == 1 and strategy == "STRICT_PACK"


def test_autoscaling_config_carries_bounds_delays_and_policy():
    m = ModelConfig(model="demo", min_replicas=0, max_replicas=5, upscale_delay_s=1, downscale_delay_s=7,
                    target_queue_depth=12)
    a = autoscaling_config(m)
    assert (a.min_replicas, a.max_replicas, a.upscale_delay_s, a.downscale_delay_s) == (0, 5, 1, 7)
    assert a.policy.policy_function == "cluster.autoscaling:QueueDepthPolicy"
    assert a.policy.policy_kwargs["target_queue_depth"] == 12


@pytest.mark.parametrize("routing, max_replicas, reports", [
    ("prefix_aware", 2, True), ("prefix_aware", 1, False), ("power_of_two", 4, False)])
def test_replicas_report_routing_stats_only_where_a_router_reads_them(routing, max_replicas, reports):
    # Serve asks a replica for routing stats (a call through its controller each period) only when the
    # deployment's class has record_routing_stats.
    m = ModelConfig(model="demo", device="cpu", max_replicas=max_replicas)
    deployment = engine_deployment(m, routing)
    assert deployment.name == engine_deployment_name("demo")
    # Ray's default worker niceness (15) would put the engine below Ray's own processes
    assert deployment.ray_actor_options["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "0"
    assert (getattr(deployment.func_or_class, "record_routing_stats", None) is not None) == reports


def test_engine_in_ingress_gives_the_ingress_the_engines_resources():
    config = ClusterConfig(engine_in_ingress=True, models=[ModelConfig(model="demo", device="cpu",
                                                                       num_cpus_per_replica=2)])
    ingress = build_app(config)._bound_deployment
    assert ingress.name == INGRESS_NAME and ingress.num_replicas == 1
    assert ingress.ray_actor_options["num_cpus"] == 2
    assert ingress.ray_actor_options["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "0"
    assert ingress.init_args[1] == {}  # no engine deployment: the ingress builds its own engine

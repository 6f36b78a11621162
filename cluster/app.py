"""build_app: a ClusterConfig -> the Serve application (one ingress, one engine deployment per model; or, with
`engine_in_ingress`, the ingress alone with the one model's engine in its process).

Also the Serve application builder: a Serve config file names `import_path: cluster.app:build_app` and passes
the ClusterConfig keys as `args` (`strata config render` writes such a file).
"""
from __future__ import annotations

import warnings

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from ray.serve.schema import LoggingConfig

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from cluster.ingress import OpenAIIngress
from cluster.replica import EngineReplica, UnroutedEngineReplica

INGRESS_NAME = "OpenAIIngress"


def build_app(config: ClusterConfig | dict) -> Application:
    config = config if isinstance(config, ClusterConfig) else ClusterConfig.model_validate(config or {})
    logging_config = LoggingConfig(enable_access_log=config.access_log)
    if config.engine_in_ingress:
        ingress, engines = ingress_with_engine(config.models[0]), {}
    else:
        engines = {m.served_name: engine_deployment(m, config.routing).options(logging_config=logging_config).bind(
            m.model_dump()) for m in config.models}
        ingress = serve.deployment(OpenAIIngress).options(
            name=INGRESS_NAME, num_replicas=config.ingress_replicas, ray_actor_options={"num_cpus": 0})
    return ingress.options(max_ongoing_requests=ingress_capacity(config), logging_config=logging_config).bind(
        config.model_dump(), engines)


# Ray starts its worker processes at niceness 15, below the raylet, GCS and log monitor (niceness 0). On a 2-core
# machine (smollm2, c=1, back to back, Serve's other workers at 15) TTFT p50 581-623 ms and TPOT 62-65 ms with the
# engine replica at 15, 504-537 and 54-57 at 0 (in-process engine: 521, 57).
ENGINE_ENV = {"RAY_worker_niceness": "0"}


def engine_deployment(m: ModelConfig, routing: str):
    options = dict(
        name=engine_deployment_name(m.served_name), **engine_process_options(m),
        max_ongoing_requests=replica_capacity(m), max_queued_requests=m.max_queue_size,
        request_router_config=request_router_config(m, routing))
    fixed = m.min_replicas == m.max_replicas and m.initial_replicas in (None, m.min_replicas)
    if fixed:
        options["num_replicas"] = m.min_replicas
    else:
        options["autoscaling_config"] = autoscaling_config(m)
    replica_class = EngineReplica if reports_routing_stats(m, routing) else UnroutedEngineReplica
    return serve.deployment(replica_class).options(**options)


def ingress_with_engine(m: ModelConfig):
    """The ingress deployment with the model's engine in its one replica (ClusterConfig.engine_in_ingress): the
    engine replica's resources, placement group and health check."""
    return serve.deployment(OpenAIIngress).options(name=INGRESS_NAME, num_replicas=1, **engine_process_options(m))


def engine_process_options(m: ModelConfig) -> dict:
    """Deployment options of a process that runs the model's engine: resources, placement group, health check."""
    actor_options, bundles, strategy = replica_resources(m, uses_gpus(m))
    actor_options["runtime_env"] = {"env_vars": dict(ENGINE_ENV)}
    return dict(ray_actor_options=actor_options, placement_group_bundles=bundles, placement_group_strategy=strategy,
                health_check_period_s=m.health_check_period_s,
                health_check_timeout_s=max(30.0, m.health_check_period_s))


def reports_routing_stats(m: ModelConfig, routing: str) -> bool:
    """Only prefix-aware routing reads a replica's routing stats, and only with more than one replica to choose."""
    return routing == "prefix_aware" and m.max_replicas > 1


def replica_resources(m: ModelConfig, gpu: bool) -> tuple[dict, list[dict], str]:
    """(ray_actor_options, placement_group_bundles, strategy) of one engine replica.

    One bundle per model shard (tensor x pipeline parallel): a GPU each on GPU clusters, a CPU each on CPU-only
    ones. The replica's own process sits in the first bundle, with its CPUs; with a single shard that process
    runs the model itself. The engine's Ray executor places shard i in bundle i of the replica's placement group.
    """
    own_cpus = m.num_cpus_per_replica
    shard = {"GPU": 1.0} if gpu else {"CPU": 1.0}
    if m.world_size == 1:
        first = {"CPU": own_cpus, **({"GPU": 1.0} if gpu else {})}
        actor = {"num_cpus": own_cpus, "num_gpus": 1 if gpu else 0}
        return actor, [first], "STRICT_PACK"
    first = {**shard, "CPU": own_cpus + shard.get("CPU", 0.0)}
    bundles = [first] + [dict(shard) for _ in range(m.world_size - 1)]
    # Tensor-parallel shards talk every layer: keep a replica on one node unless it is pipelined across nodes.
    strategy = "STRICT_PACK" if m.pipeline_parallel_size == 1 else "PACK"
    return {"num_cpus": own_cpus, "num_gpus": 0}, bundles, strategy


def uses_gpus(m: ModelConfig) -> bool:
    """Whether the model's replicas ask Ray for GPUs: the engine's device rule, on the cluster's resources."""
    return m.runs_on_gpus(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)


def request_router_config(m: ModelConfig, routing: str) -> RequestRouterConfig:
    timing = dict(request_routing_stats_period_s=m.routing_stats_period_s,
                  request_routing_stats_timeout_s=max(5.0, 5 * m.routing_stats_period_s))
    if routing == "power_of_two":
        return RequestRouterConfig(**timing)
    return RequestRouterConfig(
        request_router_class="cluster.routing:PrefixAwareRouter",
        request_router_kwargs={"block_size": m.block_size, "imbalance_threshold": m.routing_imbalance_threshold},
        **timing)


def autoscaling_config(m: ModelConfig) -> AutoscalingConfig:
    policy = AutoscalingPolicy(policy_function="cluster.autoscaling:QueueDepthPolicy", policy_kwargs={
        "target_queue_depth": m.target_queue_depth, "kv_pressure_threshold": m.kv_pressure_threshold})
    with warnings.catch_warnings():  # metrics_interval_s is deprecated in Serve but still sets the report period
        warnings.simplefilter("ignore")
        return AutoscalingConfig(
            min_replicas=m.min_replicas, max_replicas=m.max_replicas, initial_replicas=m.initial_replicas,
            upscale_delay_s=m.upscale_delay_s, downscale_delay_s=m.downscale_delay_s,
            downscale_to_zero_delay_s=m.downscale_to_zero_delay_s, look_back_period_s=m.look_back_period_s,
            metrics_interval_s=m.metrics_interval_s, policy=policy)


def replica_capacity(m: ModelConfig) -> int:
    """Requests one engine replica holds at once (Serve's max_ongoing_requests)."""
    return m.max_ongoing_requests or m.resolved_max_num_seqs(uses_gpus(m))


def ingress_capacity(config: ClusterConfig) -> int:
    """Concurrent HTTP requests one ingress replica holds: everything the engines can run or queue, plus slack."""
    return 64 + sum(m.max_replicas * replica_capacity(m) + m.max_queue_size
                    for m in config.models)

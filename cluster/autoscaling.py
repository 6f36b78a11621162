"""QueueDepthPolicy: how many engine replicas a model needs, from its queue depth and KV-cache pressure.

Serve calls the policy every control-loop tick in the controller with an AutoscalingContext. Each replica
reports `queue_depth` (waiting + running sequences in its engine) and `kv_cache_usage` through
`EngineReplica.record_autoscaling_stats`; Serve averages them over `look_back_period_s`.

    desired = ceil((sum of queue depths + requests queued at the ingress) / target_queue_depth)
    and one more replica than now when mean KV usage is above kv_pressure_threshold
    (a full KV cache means preemptions and a growing waiting queue soon).

Serve wraps the policy: it clamps to [min_replicas, max_replicas], waits `upscale_delay_s` /
`downscale_delay_s` (`downscale_to_zero_delay_s` for the last replica) before acting, and starts the first
replica of a scaled-to-zero model as soon as a request is queued for it.

This module is pickled by value into the Serve controller: keep its imports to the standard library.
"""
from __future__ import annotations

import math


class QueueDepthPolicy:
    def __init__(self, target_queue_depth: float = 32, kv_pressure_threshold: float = 0.9):
        self.target_queue_depth = target_queue_depth
        self.kv_pressure_threshold = kv_pressure_threshold

    def __call__(self, ctx) -> tuple[int, dict]:
        """ctx: ray.serve.config.AutoscalingContext. Returns (desired replicas, policy state)."""
        current = ctx.current_num_replicas
        if current == 0:  # Serve's cold-start path starts the first replica when a request waits
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        depths = metrics.get("queue_depth") or {}
        queued = ctx.total_queued_requests or 0.0  # routed nowhere yet: waiting at the ingress for a replica
        if depths:
            load = sum(depths.values()) + queued
        else:  # no engine report yet (replicas just started): fall back to Serve's request count
            load = ctx.total_num_requests
        desired = math.ceil(load / self.target_queue_depth)
        usage = metrics.get("kv_cache_usage") or {}
        if usage and sum(usage.values()) / len(usage) >= self.kv_pressure_threshold:
            desired = max(desired, current + 1)
        return desired, {}

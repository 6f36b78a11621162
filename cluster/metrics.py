"""Prometheus metrics, all named `strata_*`, served by the ingress at GET /metrics.

Two sources, one endpoint:
- Request metrics (latency histograms, request counts) are measured in the ingress process as responses stream
  through it, labelled by model.
- Engine metrics (queues, KV cache, prefix cache, preemptions, token counters) live in the engine replicas,
  other processes. At each scrape the ingress asks every replica for `engine_stats` (`handle.broadcast`) and
  exposes the answers with `model` and `replica` labels. Counters are the engines' own cumulative counts, so
  a restarted replica starts a new series (Prometheus' rate() handles the reset).

With several ingress replicas each one holds its own request metrics: scrape each, or keep one ingress.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no `*_created` series next to every counter and histogram

PREFIX = "strata_"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0)


class EngineStatsCollector:
    """Turns the latest per-replica `engine_stats` answers into metric families at scrape time."""

    GAUGES = {  # metric name: (stats key, help)
        "num_requests_waiting": ("waiting", "Sequences waiting to be scheduled."),
        "num_requests_running": ("running", "Sequences in the running batch."),
        "kv_cache_usage_ratio": ("kv_cache_usage", "Fraction of KV-cache blocks in use (1 = full)."),
        "kv_cache_blocks_used": ("kv_blocks_used", "KV-cache blocks held by requests."),
        "kv_cache_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool."),
        "prefix_cache_hit_rate": ("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up."),
        "replica_healthy": ("healthy", "1 if the replica's engine loop is alive."),
    }
    COUNTERS = {
        "prompt_tokens": ("prompt_tokens", "Prompt tokens processed."),
        "generation_tokens": ("generation_tokens", "Tokens generated."),
        "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
        "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
        "num_preemptions": ("preemptions", "Sequences preempted for lack of KV-cache blocks."),
        "engine_steps": ("steps", "Engine steps run."),
    }

    def __init__(self):
        self.replica_stats: dict[str, list[dict]] = {}  # model -> one stats dict per replica that answered

    def update(self, model: str, stats: list[dict]) -> None:
        self.replica_stats[model] = stats

    def collect(self):
        replicas = GaugeMetricFamily(PREFIX + "num_replicas", "Engine replicas that answered the last scrape.",
                                     labels=["model"])
        for model, stats in self.replica_stats.items():
            replicas.add_metric([model], len(stats))
        yield replicas
        for name, (key, help_text) in self.GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["model", "replica"])
            self._fill(family, key)
            yield family
        for name, (key, help_text) in self.COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["model", "replica"])
            self._fill(family, key)
            yield family

    def _fill(self, family, key: str) -> None:
        for model, stats in self.replica_stats.items():
            for s in stats:
                family.add_metric([model, s["replica"]], float(s.get(key) or 0))


class ServingMetrics:
    """The ingress's registry: request histograms and counters plus the engine collector."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engines = EngineStatsCollector()
        self.registry.register(self.engines)
        labels = ["model"]
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival at the API to the first generated token.", labels,
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between two tokens of one completion.", labels,
            buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival at the API to the last token.", labels,
            buckets=REQUEST_BUCKETS, registry=self.registry)
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Arrival at the API until an engine replica accepted the request "
            "(waiting for a free or starting replica).", labels, buckets=REQUEST_BUCKETS, registry=self.registry)
        self.requests = Counter(PREFIX + "requests", "Requests answered, by HTTP status.", ["model", "status"],
                                registry=self.registry)
        self.finished = Counter(PREFIX + "request_success", "Completions finished, by finish reason.",
                                ["model", "finish_reason"], registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

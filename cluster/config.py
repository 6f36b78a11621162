"""Deployment options: one pydantic schema for the YAML file, the CLI flags and the Serve config's `args`.

`ModelConfig` is an `EngineConfig` (same keys) plus how the model is deployed: its served name, replica bounds,
autoscaling targets and queue limits. `ClusterConfig` lists the models and holds the cluster-wide options.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.tool_calls import ToolCallParserName
from engine.config import EngineConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(EngineConfig):
    """One served model: the engine options of each replica, and how many replicas run."""

    name: str | None = Field(None, description="Name clients pass as `model` (default: the `model` value).")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 lets the model scale to zero when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (default: min_replicas).")
    target_queue_depth: float = Field(
        32, gt=0, description="Autoscaling target: waiting + running sequences per replica.")
    kv_pressure_threshold: float = Field(
        0.9, gt=0, le=1, description="Mean KV-cache usage above which the autoscaler adds a replica.")
    upscale_delay_s: float = Field(10.0, ge=0, description="How long load must stay high before scaling up.")
    downscale_delay_s: float = Field(120.0, ge=0, description="How long load must stay low before scaling down.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Idle time before the last replica stops (default: downscale_delay_s).")
    look_back_period_s: float = Field(10.0, gt=0, description="Window over which queue depth is averaged.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report autoscaling metrics.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one replica holds at once (default: max_num_seqs); more wait in the queue.")
    max_queue_size: int = Field(
        256, ge=1, description="Requests being routed or waiting for a free replica, per ingress replica; beyond "
                               "it the API answers 429.")
    queue_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for a replica (busy or starting) before the API answers 503.")
    num_cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved for each replica's own process.")
    routing_imbalance_threshold: int = Field(
        8, ge=0, description="Prefix routing skips replicas this many requests above the least loaded.")
    routing_stats_period_s: float = Field(
        1.0, gt=0, description="How often replicas report their cached prefixes and load to the router (only "
        "with prefix_aware routing and max_replicas above 1: otherwise no router reads the report).")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve probes each replica's engine.")
    stream_chunk_rate: float = Field(
        500.0, ge=0, description="Stream chunks per second one replica sends, shared by its streams: with k streams "
                                  "open, each sends a chunk at most every k / rate seconds, holding the tokens in "
                                  "between (its first token always goes at once); 0: every token at once.")
    tool_call_parser: ToolCallParserName | None = Field(
        None, description="How the model writes tool calls, parsed into OpenAI's tool_calls, as vLLM's "
                          "--tool-call-parser: hermes (<tool_call>{json}</tool_call>: Hermes, Qwen), llama3_json "
                          "({\"name\", \"parameters\"} answers, ;-separated: Llama 3.1-3.3) or mistral "
                          "([TOOL_CALLS] [{json}, ...]). Default: the one whose format the chat template writes, "
                          "else none (a request with tools gets a 400).")
    request_retries: int = Field(
        2, ge=0, description="Times a request moves to another replica when its replica fails before any of its "
                             "output reached the client.")

    @property
    def served_name(self) -> str:
        return self.name or self.model

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields)))

    @model_validator(mode="after")
    def _replica_bounds(self) -> ModelConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self


class HTTPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    direct_ingress: bool | None = Field(
        None, description="Where Strata starts Ray itself (strata serve without --address): the ingress serves HTTP "
                          "on the port itself, skipping Serve's proxy hop (3.6 ms of TTFT on one H100). Unset: on "
                          "with one ingress replica, off with several (each would listen on a port of its own: "
                          "port, port + 1, ...; Serve's proxy spreads requests over them). Clusters started by "
                          "`ray up` or KubeRay keep Serve's proxy.")


class LimitsConfig(BaseModel):
    """Bounds on one request, checked at the API before any work is queued."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = Field(4 << 20, ge=1, description="Largest request body; bigger ones get 413.")
    max_n: int = Field(16, ge=1, description="Largest `n` (completions per prompt).")
    max_prompts: int = Field(64, ge=1, description="Most prompts in one /v1/completions batch.")
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, in characters.")
    retry_after_s: int = Field(2, ge=0, description="Retry-After seconds sent with 429 and 503 answers.")


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1,
                                      description="The served models, one engine deployment each.")
    routing: Literal["prefix_aware", "power_of_two"] = Field(
        "prefix_aware", description="Replica choice: prefix_aware (load gate, prefix affinity, power of two) or "
                                    "power_of_two (Serve's default).")
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    api_keys: list[str] = Field(default_factory=list,
                                description="Bearer keys accepted on /v1/*; empty: no authentication.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    app_name: str = Field("strata", description="Name of the Serve application.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    engine_in_ingress: bool = Field(
        False, description="Run the model's engine inside the HTTP ingress replica, as `vllm serve` does: no Serve "
                           "call between them. Only for one model with one replica (no autoscaling, no routing).")
    access_log: bool = Field(False, description="Serve's access log: a line per request in each replica's log "
                                                "(costs CPU on every request).")
    log_requests: bool = Field(False, description="Log every request's body, prompts included (debugging only: "
                                                  "prompts may hold personal data).")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, keys: list[str]) -> list[str]:
        if any(not k for k in keys):
            raise ValueError("api_keys must not contain empty strings")
        return keys

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterConfig:
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served model names must be unique; repeated: {', '.join(dupes)} (set `name:`)")
        deployments = [engine_deployment_name(n) for n in names]
        if len(set(deployments)) != len(deployments):
            raise ValueError("two model names map to the same deployment name; rename one with `name:`")
        return self

    @model_validator(mode="after")
    def _engine_in_ingress_fits(self) -> ClusterConfig:
        if not self.engine_in_ingress:
            return self
        if len(self.models) != 1 or self.ingress_replicas != 1:
            raise ValueError("engine_in_ingress serves one model from one ingress replica; this config has "
                             f"{len(self.models)} models and ingress_replicas {self.ingress_replicas}")
        m = self.models[0]
        if (m.min_replicas, m.max_replicas, m.initial_replicas or 1) != (1, 1, 1):
            raise ValueError("engine_in_ingress runs exactly one replica: set min_replicas and max_replicas to 1 "
                             "(or turn engine_in_ingress off to autoscale)")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.served_name == name), None)

    @property
    def serves_http_directly(self) -> bool:
        """Whether the ingress serves HTTP itself on a cluster Strata starts (http.direct_ingress, resolved)."""
        if self.http.direct_ingress is not None:
            return self.http.direct_ingress
        return self.ingress_replicas == 1

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        return cls.model_validate(load_yaml(path))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def engine_deployment_name(served_name: str) -> str:
    """The Serve deployment that runs a model's engine replicas."""
    return "EngineReplica-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", served_name).strip("-")

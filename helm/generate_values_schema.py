"""Write the chart's two files that come from the config models (cluster/config.py, engine/config.py):

- helm/strata/values.schema.json: the chart's own keys, plus the `strata:` block as the JSON schema of
  ClusterConfig, so `helm install` rejects what `strata serve` would reject: unknown keys, wrong types, values
  out of range. Rules a JSON schema cannot state (max_replicas >= min_replicas, unique served names) are
  checked by the chart's templates.
- helm/strata/files/config-defaults.yaml: the defaults of ClusterConfig and ModelConfig. The templates read
  the keys a user left unset from it (worker sizing, ports, the app name), so no default is typed in the chart.

    .venv/bin/python helm/generate_values_schema.py     # after changing cluster/config.py or engine/config.py

tests/deploy/test_helm_chart.py fails when either file differs from what this script writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "strata"
SCHEMA_FILE = CHART / "values.schema.json"
DEFAULTS_FILE = CHART / "files" / "config-defaults.yaml"

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_LIST = {"type": "array"}
ANY_MAP = {"type": "object"}
NULLABLE_COUNT = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
QUANTITY = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "number", "minimum": 0}]}
RESOURCES = {
    "type": "object", "additionalProperties": False,
    "properties": {"requests": {"type": "object", "additionalProperties": QUANTITY},
                   "limits": {"type": "object", "additionalProperties": QUANTITY}},
}
SECRET_REF = {
    "type": "object", "additionalProperties": False, "required": ["name", "key"],
    "properties": {"name": {"type": "string", "description": "Secret name; empty: not used."},
                   "key": {"type": "string", "minLength": 1, "description": "Key inside the Secret."}},
}
POD_PLACEMENT = {"nodeSelector": STRING_MAP, "tolerations": ANY_LIST, "affinity": ANY_MAP,
                 "rayStartParams": {"type": "object",
                                    "additionalProperties": {"type": ["string", "number", "boolean"]}}}


def strata_block() -> dict:
    """ClusterConfig's schema, tightened for Kubernetes: every model names its model, and the server listens on
    every interface (probes and Services reach the pod IP)."""
    return {
        "description": "ClusterConfig keys (cluster/config.py): the Serve config's args, as `strata config render`.",
        "allOf": [
            {"$ref": "#/definitions/ClusterConfig"},
            {"required": ["models", "http"],
             "properties": {
                 "models": {"items": {"required": ["model"]}},
                 "http": {"required": ["host"],
                          "properties": {"host": {"enum": ["0.0.0.0", "::"],
                                                  "description": "Listen on every interface (Kubernetes)."}}},
             }},
        ],
    }


def chart_schema() -> dict:
    from cluster.config import ClusterConfig

    cluster = ClusterConfig.model_json_schema(ref_template="#/definitions/{model}")
    definitions = cluster.pop("$defs")
    definitions["ClusterConfig"] = cluster
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the Strata Helm chart",
        "type": "object",
        "additionalProperties": False,
        "required": ["strata", "image", "rayVersion", "head", "workers", "service"],
        "properties": {
            "strata": strata_block(),
            "image": {"type": "object", "additionalProperties": False, "required": ["repository", "tag"],
                      "properties": {"repository": {"type": "string", "minLength": 1},
                                     "tag": {"type": "string", "minLength": 1},
                                     "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}},
            "imagePullSecrets": ANY_LIST,
            "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            "hfTokenSecret": SECRET_REF,
            "apiKeySecret": SECRET_REF,
            "head": {"type": "object", "additionalProperties": False, "properties": {
                "image": {"type": "object", "additionalProperties": False,
                          "properties": {"repository": {"type": "string", "minLength": 1},
                                         "tag": {"type": "string", "minLength": 1}}},
                "resources": RESOURCES, "sharedMemory": QUANTITY, **POD_PLACEMENT}},
            "workers": {"type": "object", "additionalProperties": False, "properties": {
                "gpu": {"type": "object", "additionalProperties": False, "properties": {
                    "count": {**NULLABLE_COUNT,
                              "description": "GPUs per worker pod; null: the largest tensor_parallel_size; 0: CPU."},
                    "resourceName": {"type": "string", "minLength": 1},
                    "type": {"type": "string", "description": "GPU type: the value of the typeLabel node label."},
                    "typeLabel": {"type": "string", "minLength": 1}}},
                "minReplicas": NULLABLE_COUNT, "maxReplicas": NULLABLE_COUNT,
                "resources": RESOURCES, "sharedMemory": QUANTITY, **POD_PLACEMENT}},
            "autoscaler": {"type": "object", "additionalProperties": False, "properties": {
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "resources": RESOURCES}},
            "rayService": {"type": "object", "additionalProperties": False, "properties": {
                "upgradeStrategy": {"enum": ["NewCluster", "None"]}}},
            "service": {"type": "object", "additionalProperties": False, "properties": {
                "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                "annotations": STRING_MAP,
                "loadBalancerSourceRanges": {"type": "array", "items": {"type": "string"}},
                "excludeHead": {"type": "boolean"}}},
            "ingress": {"type": "object", "additionalProperties": False, "properties": {
                "enabled": {"type": "boolean"}, "className": {"type": "string"}, "annotations": STRING_MAP,
                "hosts": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["paths"],
                    "properties": {"host": {"type": "string"},
                                   "paths": {"type": "array", "minItems": 1,
                                             "items": {"type": "string", "pattern": "^/"}}}}},
                "tls": ANY_LIST}},
            "serviceMonitor": {"type": "object", "additionalProperties": False, "properties": {
                "enabled": {"type": "boolean"}, "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                "labels": STRING_MAP}},
            "extraEnv": ANY_LIST, "extraVolumes": ANY_LIST, "extraVolumeMounts": ANY_LIST,
        },
        "definitions": definitions,
    }


def config_defaults() -> dict:
    """{"cluster": ClusterConfig's defaults but `models`, "model": ModelConfig's}, as the config file spells them."""
    from cluster.config import ClusterConfig, ModelConfig

    return {"cluster": ClusterConfig().model_dump(mode="json", exclude={"models"}),
            "model": ModelConfig().model_dump(mode="json")}


def schema_text() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


def defaults_text() -> str:
    return ("# Generated by helm/generate_values_schema.py from cluster/config.py: do not edit. The defaults of the\n"
            "# `strata:` keys; the templates take every key a user leaves unset from here.\n"
            + yaml.safe_dump(config_defaults(), sort_keys=False))


def generated_files() -> dict[Path, str]:
    return {SCHEMA_FILE: schema_text(), DEFAULTS_FILE: defaults_text()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path, text in generated_files().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")

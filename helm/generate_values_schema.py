"""Write helm/strata/values.schema.json: the chart's own keys, plus the `strata:` block as the JSON schema of
ClusterConfig (cluster/config.py), so `helm install` rejects what `strata serve` would reject: unknown keys,
wrong types, values out of range.

    .venv/bin/python helm/generate_values_schema.py     # after changing cluster/config.py or engine/config.py

tests/deploy/test_helm_chart.py fails when the file differs from what this script writes. Rules a JSON schema
cannot state (max_replicas >= min_replicas, unique served names) are checked by the chart's templates.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "helm" / "strata" / "values.schema.json"

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
                 "http": {"required": ["host", "port"],
                          "properties": {"host": {"enum": ["0.0.0.0", "::"],
                                                  "description": "Listen on every interface (Kubernetes)."}}},
             }},
        ],
    }


def chart_schema() -> dict:
    sys.path.insert(0, str(ROOT))
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


def schema_text() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}")

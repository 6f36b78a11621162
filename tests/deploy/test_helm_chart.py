"""helm/strata, rendered and linted by Helm's own Go library (helm-python-sdk), for the default values and
several variants. Every RayService is validated against KubeRay's CRD schema (and its cluster as a RayCluster),
strictly: an unknown field fails, as it does with `kubectl apply --validate=strict`. Its serveConfigV2 must
equal what `strata config render` prints for the same config. Bad values must fail at install time. The chart's
defaults are ClusterConfig's, read from the file helm/generate_values_schema.py writes, never typed twice.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import helm_python as helm
import jsonschema
import pytest
import yaml

from cluster.cli import main as strata_main
from cluster.config import ClusterConfig
from tests.support.paths import CHART, ROOT

RELEASE, NAMESPACE = "llm", "serving"
CRD_SCHEMAS = Path(__file__).resolve().parent / "data"  # KubeRay's, extracted by data/extract_crd_schemas.py


# -- rendering ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None) -> dict[str, list[dict]]:
    """{kind: [manifest, ...]} of everything the chart renders (NOTES.txt under "NOTES")."""
    out: dict[str, list] = {}
    for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True).items():
        if path.endswith("NOTES.txt"):
            out["NOTES"] = [text]
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def merged_strata_values(chart, values: dict | None) -> dict:
    """The `strata:` block as the chart sees it (defaults coalesced with overrides, as an install does)."""
    return chart.merge_values(values)["strata"]


def strata_render(config: dict, tmp_path) -> dict:
    """`strata config render --config FILE`, in this process (the CLI's own code path), parsed."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert strata_main(["config", "render", "--config", str(path)]) == 0
    return yaml.safe_load(stdout.getvalue())


# -- KubeRay CRD schemas ----------------------------------------------------------------------------------------
def strict(schema):
    """The CRD schema with unknown fields rejected (structural schemas prune them; strict validation fails)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for kind in ("RayService", "RayCluster"):
        schema = strict(json.loads((CRD_SCHEMAS / f"{kind.lower()}.v1.schema.json").read_text()))
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def assert_valid(validator: jsonschema.Draft7Validator, manifest: dict) -> None:
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10])


# -- the variants -----------------------------------------------------------------------------------------------
GPU = {"device": "cuda"}
VARIANTS = {
    # name: (values, expected worker group: (GPUs per pod, minReplicas, maxReplicas, replicas))
    "default": ({}, (1, 1, 2, 1)),
    "multi-model": ({"strata": {"models": [
        {"model": "Qwen/Qwen2.5-7B-Instruct", "name": "qwen-7b", "tensor_parallel_size": 2, "min_replicas": 1,
         "max_replicas": 3, "target_queue_depth": 16, "max_model_len": 8192, **GPU},
        {"model": "smollm2-135m-instruct", "name": "small", "min_replicas": 0, "max_replicas": 2, **GPU},
    ], "routing": "power_of_two"}}, (2, 1, 5, 1)),
    "tp8-pp2": ({"strata": {"models": [
        {"model": "meta-llama/Llama-3.1-405B-Instruct", "tensor_parallel_size": 8, "pipeline_parallel_size": 2,
         "min_replicas": 1, "max_replicas": 2, "dtype": "bfloat16", **GPU}]},
        "workers": {"gpu": {"type": "NVIDIA-H100-80GB-HBM3"}},
        "hfTokenSecret": {"name": "hf-token", "key": "token"}}, (8, 2, 4, 2)),
    "model-defaults": ({"strata": {"models": [{"model": "smollm2-135m-instruct", **GPU}]}}, (1, 1, 1, 1)),
    "loadbalancer": ({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                                  "annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}}},
                     (1, 1, 2, 1)),
    "scale-to-zero": ({"strata": {"models": [
        {"model": "smollm2-135m-instruct", "min_replicas": 0, "max_replicas": 4, "downscale_to_zero_delay_s": 600,
         **GPU}]}, "autoscaler": {"idleTimeoutSeconds": 60}}, (1, 0, 4, 0)),
    "cpu-only": ({"strata": {"models": [{"model": "smollm2-135m-instruct", "device": "cpu", "max_replicas": 2}]},
                  "workers": {"gpu": {"count": 0}, "tolerations": []},
                  "image": {"tag": "0.1.0-cpu"}}, (0, 1, 2, 1)),
    "everything-on": ({"ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "llm.example.com",
                                                                                      "paths": ["/"]}],
                                   "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
                       "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                       "apiKeySecret": {"name": "strata-keys", "key": "api-keys"},
                       "hfTokenSecret": {"name": "hf-token", "key": "token"},
                       "head": {"image": {"tag": "0.1.0-cpu"}, "rayStartParams": {"object-store-memory": 2000000000}},
                       "strata": {"limits": {"max_n": 4}, "ingress_replicas": 2}}, (1, 1, 2, 1)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, chart):
    values, expected = VARIANTS[request.param]
    return request.param, values, render(chart, values), expected


def the_rayservice(manifests) -> dict:
    (rayservice,) = manifests["RayService"]
    return rayservice


def test_rendered_rayservice_and_raycluster_match_the_kuberay_crds(variant, crd_validators):
    _, _, manifests, _ = variant
    rayservice = the_rayservice(manifests)
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert_valid(crd_validators["RayService"], rayservice)
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "llm-strata-x"},
                  "spec": rayservice["spec"]["rayClusterConfig"]}  # what the operator creates from it
    assert_valid(crd_validators["RayCluster"], raycluster)


@pytest.mark.parametrize("mistake", [
    lambda rs: rs["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoScaling", True),  # misspelt field
    lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),  # required field
    lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].__setitem__("num-gpus", 0),
    lambda rs: rs["spec"]["rayClusterConfig"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
    lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    .__setitem__("imagePullPolicy", 3),
])
def test_the_crd_validation_catches_mistakes(chart, crd_validators, mistake):
    rayservice = the_rayservice(render(chart))
    mistake(rayservice)
    assert list(crd_validators["RayService"].iter_errors(rayservice))


def test_serve_config_equals_strata_config_render(variant, chart, tmp_path):
    _, values, manifests, _ = variant
    serve_config = yaml.safe_load(the_rayservice(manifests)["spec"]["serveConfigV2"])
    assert serve_config == strata_render(merged_strata_values(chart, values), tmp_path)
    ClusterConfig.model_validate(serve_config["applications"][0]["args"])  # and the app accepts it


def test_head_has_no_gpus_and_the_autoscaler_runs(variant):
    _, _, manifests, _ = variant
    cluster = the_rayservice(manifests)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not any("gpu" in k for k in head["resources"].get("limits", {}))


def test_worker_group_is_sized_from_tp_pp_and_replica_bounds(variant):
    name, values, manifests, (gpus, min_pods, max_pods, initial) = variant
    (group,) = the_rayservice(manifests)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (min_pods, max_pods, initial)
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    assert worker["resources"]["requests"].get("nvidia.com/gpu", 0) == gpus
    if gpu_type := values.get("workers", {}).get("gpu", {}).get("type"):
        assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": gpu_type}


def test_workers_are_ready_only_while_their_serve_proxy_can_route(variant):
    _, values, manifests, _ = variant
    (group,) = the_rayservice(manifests)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": "serve"}
    assert {"name": "serve", "containerPort": 8000} in worker["ports"]


def test_the_service_exposes_only_the_serve_port(variant):
    name, values, manifests, _ = variant
    service = the_rayservice(manifests)["spec"]["serveService"]
    assert service["metadata"]["name"] == f"{RELEASE}-strata"
    assert service["spec"]["type"] == values.get("service", {}).get("type", "ClusterIP")
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "protocol": "TCP"}]
    assert "Service" not in manifests or all(  # the optional metrics Service: head pod, Serve port only
        [p["targetPort"] for p in s["spec"]["ports"]] == ["serve"] for s in manifests["Service"])


def test_secrets_reach_every_ray_container_as_env(variant):
    _, values, manifests, _ = variant
    cluster = the_rayservice(manifests)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for env_name, key in (("HF_TOKEN", "hfTokenSecret"), ("STRATA_API_KEYS", "apiKeySecret")):
        secret = values.get(key)
        for pod in pods:
            env = {e["name"]: e for e in pod["spec"]["containers"][0].get("env", [])}
            if secret:
                assert env[env_name]["valueFrom"]["secretKeyRef"] == secret
            else:
                assert env_name not in env


def test_notes_show_the_curl_line_for_the_first_model(variant, chart):
    _, values, manifests, _ = variant
    notes = manifests["NOTES"][0]
    model = merged_strata_values(chart, values)["models"][0]
    assert "curl $STRATA_URL/v1/chat/completions" in notes
    assert f'"model": "{model.get("name") or model["model"]}"' in notes
    assert "port-forward" in notes and "head-svc 8265:8265" in notes


def test_ingress_and_service_monitor_point_at_what_the_chart_creates(chart):
    manifests = render(chart, VARIANTS["everything-on"][0])
    (ingress,) = manifests["Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-strata", "port": {"number": 8000}}
    (monitor,) = manifests["ServiceMonitor"]
    (metrics_service,) = manifests["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0] == {"port": "strata-metrics", "path": "/metrics", "interval": "15s"}
    head_labels = the_rayservice(manifests)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert metrics_service["spec"]["selector"].items() <= head_labels["labels"].items()
    assert "Ingress" not in render(chart) and "ServiceMonitor" not in render(chart)


@pytest.mark.parametrize("values", [None, VARIANTS["tp8-pp2"][0], VARIANTS["everything-on"][0]])
def test_helm_lint_finds_nothing(values):
    report = helm.lint(CHART, values, strict=True)
    assert not report["errors"], report
    # Severity 1 is informational (e.g. "icon is recommended"); warnings and errors fail.
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


# -- bad values fail at install time ------------------------------------------------------------------------------
BAD_VALUES = [
    # (values, words of the error): the schema (from ClusterConfig) ...
    ({"strata": {"models": [{"model": "m", "tensor_paralel_size": 2, **GPU}]}}, "tensor_paralel_size"),
    ({"strata": {"models": [{"model": "m", "min_replicas": -1, **GPU}]}}, "min_replicas"),
    ({"strata": {"models": [{"model": "m", "block_size": "big", **GPU}]}}, "block_size"),
    ({"strata": {"models": [{"model": "m", "dtype": "float8", **GPU}]}}, "dtype"),
    ({"strata": {"models": [{"name": "no-model", **GPU}]}}, "model"),
    ({"strata": {"models": []}}, "models"),
    ({"strata": {"routing": "round_robin"}}, "routing"),
    ({"strata": {"http": {"host": "127.0.0.1", "port": 8000}}}, "host"),
    ({"strata": {"replicas": 3}}, "replicas"),
    # ... the chart's own keys ...
    ({"service": {"type": "NodeBalancer"}}, "type"),
    ({"workers": {"gpu": {"count": -1}}}, "count"),
    ({"imageTag": "latest"}, "imageTag"),
    ({"rayVersion": "latest"}, "rayVersion"),
    # ... and what only the templates can check.
    ({"strata": {"models": [{"model": "m", "min_replicas": 3, "max_replicas": 1, **GPU}]}}, "max_replicas"),
    ({"strata": {"models": [{"model": "m", **GPU}, {"model": "m", **GPU}]}}, "set `name:`"),
    ({"strata": {"models": [{"model": "m", "tensor_parallel_size": 8, **GPU}]}, "workers": {"gpu": {"count": 4}}},
     "does not fit"),
    ({"strata": {"models": [{"model": "m", "device": "auto"}]}}, "device: cuda"),
    ({"strata": {"models": [{"model": "m", **GPU}]}, "workers": {"gpu": {"count": 0}}}, "needs GPU workers"),
    ({"strata": {"api_keys": ["secret"]}}, "apiKeySecret"),
]


@pytest.mark.parametrize("values, words", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_bad_values_fail_at_install_time(chart, values, words):
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as error:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert words in str(error.value), str(error.value)


# -- the chart stays in step with the code --------------------------------------------------------------------
def load_generator():
    spec = importlib.util.spec_from_file_location("generate_values_schema", ROOT / "helm" / "generate_values_schema.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return generator


def test_the_files_generated_from_the_config_models_are_current():
    for path, text in load_generator().generated_files().items():
        assert path.read_text() == text, \
            f"{path.relative_to(ROOT)} is stale: run `.venv/bin/python helm/generate_values_schema.py`"


def test_values_yaml_repeats_no_config_default(chart):
    """values.yaml sets a `strata:` key only where the chart wants something else than ClusterConfig's default
    (`model` aside: the chart asks every model to name one)."""
    from cluster.config import HTTPConfig, ModelConfig

    strata = chart.values["strata"]
    for schema, block in [(ClusterConfig, {k: v for k, v in strata.items() if k != "models"}),
                          (HTTPConfig, strata["http"]), *[(ModelConfig, m) for m in strata["models"]]]:
        defaults = schema().model_dump(mode="json")
        repeated = {k for k, v in block.items() if k != "model" and not isinstance(v, dict) and v == defaults[k]}
        assert not repeated, f"values.yaml repeats {schema.__name__} defaults: {sorted(repeated)}"


def test_templates_type_no_default_value():
    """Unset config keys come from files/config-defaults.yaml, never from a literal in a template."""
    literal_default = re.compile(r'\|\s*default\s+("[^"]*"|-?\d[\d.]*|true\b|false\b)')
    for template in (CHART / "templates").iterdir():
        assert not literal_default.findall(template.read_text()), template.name


def sizing_from_the_config(values: dict, workers: dict) -> tuple[int, int, int, int]:
    """(GPUs per pod, minReplicas, maxReplicas, replicas), computed from ClusterConfig (its defaults included)."""
    models = ClusterConfig.model_validate(values).models
    gpus = workers.get("gpu", {}).get("count")
    gpus = max(m.tensor_parallel_size for m in models) if gpus is None else gpus
    pods = [-(-m.world_size // gpus) if gpus else 1 for m in models]
    low = sum(m.min_replicas * n for m, n in zip(models, pods))
    high = sum(m.max_replicas * n for m, n in zip(models, pods))
    initial = sum((m.initial_replicas if m.initial_replicas is not None else m.min_replicas) * n
                  for m, n in zip(models, pods))
    return gpus, low, high, min(high, max(low, initial))


def test_worker_group_is_sized_from_the_config_models_defaults_included(variant, chart):
    _, values, manifests, expected = variant
    (group,) = the_rayservice(manifests)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    rendered = (group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0),
                group["minReplicas"], group["maxReplicas"], group["replicas"])
    assert rendered == expected == sizing_from_the_config(merged_strata_values(chart, values),
                                                          values.get("workers", {}))


def test_the_chart_takes_unset_keys_from_the_generated_defaults(tmp_path):
    """Change the defaults file alone, and what the chart derives from unset keys follows."""
    copy_of_chart = tmp_path / "strata"
    shutil.copytree(CHART, copy_of_chart)
    defaults_file = copy_of_chart / "files" / "config-defaults.yaml"
    defaults = yaml.safe_load(defaults_file.read_text())
    defaults["model"].update(tensor_parallel_size=2, max_replicas=3)
    defaults["cluster"]["http"]["port"] = 9000
    defaults["cluster"]["app_name"] = "from-defaults"
    defaults_file.write_text(yaml.safe_dump(defaults))
    values = {"strata": {"models": [{"model": "m", "device": "cuda"}], "http": {"host": "0.0.0.0"}}}
    with helm.Chart.load(copy_of_chart) as loaded:
        manifests = render(loaded, values)
    rayservice = the_rayservice(manifests)
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert (worker["resources"]["limits"]["nvidia.com/gpu"], group["maxReplicas"]) == (2, 3)
    assert {"name": "serve", "containerPort": 9000} in worker["ports"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == 9000
    assert serve_config["applications"][0]["name"] == "from-defaults"
    assert serve_config["applications"][0]["args"] == values["strata"]  # only what the user set


def test_default_values_are_a_valid_cluster_config_and_pin_the_projects_ray(chart):
    values = chart.values
    config = ClusterConfig.model_validate(values["strata"])
    assert config.http.host == "0.0.0.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1) == values["rayVersion"]
    assert chart.metadata["appVersion"] == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert values["image"]["tag"].startswith(chart.metadata["appVersion"])


def test_every_strata_value_key_is_a_config_key(chart):
    """The documented `strata:` keys are ClusterConfig / ModelConfig field names, nothing else."""
    from cluster.config import ModelConfig

    values = copy.deepcopy(chart.values["strata"])
    assert set(values) <= set(ClusterConfig.model_fields)
    for model in values["models"]:
        assert set(model) <= set(ModelConfig.model_fields)

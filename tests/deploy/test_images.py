"""The CPU image, built and run for real: deploy/docker/build_local.sh builds deploy/docker/Dockerfile.cpu on a
local Debian base (the Dockerfile unchanged, only BASE_IMAGE differs), and podman runs it two ways:

- as the Helm chart's RayService head: the chart is rendered (helm-python-sdk), and the head container gets the
  image, env, /dev/shm and `ray start` command that KubeRay would give it, built from the rendered manifest by
  kuberay_head() below (KubeRay's own rules: ray-operator/controllers/ray/common/pod.go). serveConfigV2 is then
  deployed through the head's dashboard, as the KubeRay operator does, and the official openai client talks to
  the demo model and the built-in SmolLM2;
- as `ray up` with deploy/ray-up/onprem.yaml: a head and a worker container on two hosts, started with that
  file's own `ray start` lines and its `strata deploy` line; the model's replica lands on the worker.

Not run here: KubeRay's autoscaler sidecar (it needs a Kubernetes API), and onprem.yaml's `ulimit -n 65536`
(this machine refuses to raise limits, so the containers get 4096 and the line's ulimit prints an error).
Needs root (debootstrap, buildah, podman, network namespaces); Debian's packages are installed when missing.
"""
from __future__ import annotations

import json
import os
import subprocess

import httpx
import openai
import pytest
import yaml

from tests.support import containers
from tests.support.paths import CHART, DEPLOY, ROOT
from tests.support.polling import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="building and running images needs root")]

API_KEY = "sk-image-test"
# The Kubernetes Secret the chart's apiKeySecret names, as `kubectl create secret` would hold it.
SECRETS = {"strata-keys": {"api-keys": API_KEY}}
CHART_VALUES = {
    "strata": {"models": [{"model": "demo", "device": "cpu", "num_kv_blocks": 128},
                          {"model": "smollm2-135m-instruct", "device": "cpu", "num_kv_blocks": 128}]},
    "workers": {"gpu": {"count": 0}, "tolerations": []},
    "image": {"repository": "localhost/strata", "tag": "cpu"},
    "apiKeySecret": {"name": "strata-keys", "key": "api-keys"},
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """deploy/docker/build_local.sh's CPU image (its layers and the Debian base are cached between runs). Its
    size and build time go to a temporary folder: benchmarks/results/ holds those of a run by hand."""
    env = os.environ | {"STRATA_RESULTS": str(tmp_path_factory.mktemp("image-results"))}
    try:
        out = subprocess.run([str(DEPLOY / "docker" / "build_local.sh"), "cpu"], capture_output=True, text=True,
                             timeout=1500, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"build_local.sh did not finish in {e.timeout} s")
    assert out.returncode == 0, f"build_local.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def network():
    containers.sweep_leftovers()
    net = containers.Network()
    yield net
    net.close()


def test_the_image_runs_as_ray_with_python_311_and_no_build_leftovers(image):
    run = ["run", "--rm", "--network", "none", *containers.ULIMITS]
    script = "id -un; python -c 'import sys; print(*sys.version_info[:2])'; python -c 'import engine, cluster.app; " \
             "print(\"imports ok\")'; command -v strata ray"
    out = containers.podman(*run, image, "bash", "-lc", script, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["ray", "3 11", "imports ok"], out.stdout
    assert out.stdout.split("\n")[3:5] == ["/opt/strata-venv/bin/strata", "/opt/strata-venv/bin/ray"]
    leftovers = containers.podman(*run, "--user", "root", image, "sh", "-c",
                                  "ls -d /root/.cache/pip /var/lib/apt/lists/*deb* /var/cache/apt/archives/*.deb "
                                  "/opt/strata-venv/lib/python3*/site-packages/pytest 2>/dev/null", check=False)
    assert leftovers.stdout == "", f"build leftovers or test extras in the image: {leftovers.stdout}"


# -- the Helm chart's head, as KubeRay starts it ---------------------------------------------------------------
def quantity(value: str) -> int:
    """A Kubernetes quantity as an integer, rounded up (KubeRay's Quantity.Value())."""
    units = {"m": 0.001, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if str(value).endswith(unit):
            return -int(-float(str(value)[:-len(unit)]) * factor // 1)
    return int(value)


def kuberay_head(rayservice: dict, secrets: dict) -> tuple[str, list[str], dict[str, str], int]:
    """(image, container args, env, /dev/shm bytes) of the head pod KubeRay makes from the RayService: the
    chart's rayStartParams completed with KubeRay's defaults and the container's CPU and memory limits, its env
    with secrets resolved, plus the env KubeRay adds."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    container = next(c for c in head["template"]["spec"]["containers"] if c["name"] == "ray-head")
    assert not container.get("command") and not container.get("args"), "KubeRay would prepend them: handle it"
    params = dict(head["rayStartParams"])
    params.setdefault("dashboard-host", "0.0.0.0")
    if cluster.get("enableInTreeAutoscaling"):
        params["no-monitor"] = "true"  # the autoscaler runs as a sidecar instead
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        params.setdefault("num-cpus", str(quantity(limits["cpu"])))
    if "memory" in limits:
        params.setdefault("memory", str(quantity(limits["memory"])))
    flags = " ".join(f"--{k}" if v.lower() == "true" else f"--{k}={v}"
                     for k, v in sorted(params.items()) if v.lower() != "false")
    ray_start = f"ray start --head {flags}"
    env = {}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = secrets[ref["name"]][ref["key"]] if ref else var["value"]
    port = params.get("port", "6379")
    name = rayservice["metadata"]["name"]
    env |= {"RAY_CLUSTER_NAME": name, "RAY_CLOUD_INSTANCE_ID": f"{name}-head", "RAY_NODE_TYPE_NAME": "headgroup",
            "KUBERAY_GEN_RAY_START_CMD": ray_start,
            "RAY_PORT": port, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TIMEOUT_MS_TASK_WAIT_FOR_DEATH_INFO": "0",
            "RAY_GCS_SERVER_REQUEST_TIMEOUT_SECONDS": "5", "RAY_SERVE_KV_TIMEOUT_S": "5",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1"}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    shm = next(v["emptyDir"]["sizeLimit"] for v in head["template"]["spec"]["volumes"]
               if mounts.get(v["name"]) == "/dev/shm" and v.get("emptyDir", {}).get("medium") == "Memory")
    return container["image"], [f"ulimit -n 65536; {ray_start}"], env, quantity(shm)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(CHART_VALUES, name="llm", namespace="serving", is_install=True)
    docs = [d for text in rendered.values() if text.lstrip().startswith(("apiVersion", "#", "---"))
            for d in yaml.safe_load_all(text) if d]
    return next(d for d in docs if d["kind"] == "RayService")


def deploy_serve_config(dashboard: str, serve_config_yaml: str, timeout: float = 600) -> dict:
    """What the KubeRay operator does with serveConfigV2: PUT it to the dashboard's Serve REST API, then poll the
    applications until they all run. The applications' status."""
    put = httpx.put(f"{dashboard}/api/serve/applications/", json=yaml.safe_load(serve_config_yaml), timeout=60)
    assert put.status_code == 200, put.text

    def running():
        apps = httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).json().get("applications", {})
        states = {name: app["status"] for name, app in apps.items()}
        assert "DEPLOY_FAILED" not in states.values(), json.dumps(apps, indent=1)[-4000:]
        return apps if states and set(states.values()) == {"RUNNING"} else None

    return wait_for(running, timeout=timeout, interval=2, what="the Serve applications to run")


def answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:  # not listening yet
        return False


def test_the_image_serves_as_the_helm_charts_rayservice_head(image, rayservice, network):
    chart_image, args, env, shm_bytes = kuberay_head(rayservice, SECRETS)
    assert chart_image == image, "the chart's image values name the image built here"
    host = network.add_host("head")
    # KubeRay replaces the image's entrypoint with a login shell, which runs the generated `ray start`.
    head = network.start(image, host, entrypoint=["/bin/bash", "-lc", "--"], args=args, env=env,
                         options=["--shm-size", str(shm_bytes)])
    dashboard, serve = f"http://{host.ip}:8265", f"http://{host.ip}:8000"
    try:
        wait_for(lambda: answers_200(f"{dashboard}/api/version"), timeout=120, interval=1, what="the dashboard")
        deploy_serve_config(dashboard, rayservice["spec"]["serveConfigV2"])
        wait_for(lambda: answers_200(f"{serve}/health"), timeout=120, interval=1, what="/health")
        assert httpx.get(f"{serve}/v1/models", timeout=10).status_code == 401, "the chart's API key secret"

        client = openai.OpenAI(base_url=f"{serve}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        assert {m.id for m in client.models.list()} == {"demo", "smollm2-135m-instruct"}
        demo = client.completions.create(model="demo", prompt="Containers", max_tokens=8, temperature=0)
        assert demo.usage.completion_tokens == 8 and demo.choices[0].finish_reason == "length"
        answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=16,
                                                temperature=0)
        assert answer.choices[0].message.content.strip() == "The capital of France is Paris."
        streamed = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                                  max_tokens=16, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            answer.choices[0].message.content
        # Structured outputs (xgrammar) work in the CPU image, which has no Triton.
        choice = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=8,
                                                temperature=1, seed=3, extra_body={"guided_choice": ["Lyon", "Nice"]})
        assert choice.choices[0].message.content in ("Lyon", "Nice")
    except BaseException:
        print(containers.logs(head))
        raise


# -- ray up: deploy/ray-up/onprem.yaml's own start lines, in a head and a worker container ------------------------
def test_ray_up_start_lines_join_a_worker_container_that_hosts_the_replica(image, network, tmp_path):
    onprem = yaml.safe_load((DEPLOY / "ray-up" / "onprem.yaml").read_text())
    head_host, worker_host = network.add_host("head"), network.add_host("worker")
    # What `ray up` leaves on the head: the cluster config (~/ray_bootstrap_config.yaml), here with this test's
    # hosts and no workers for the autoscaler to set up over SSH (the worker container starts itself), and the
    # checkout at ~/strata, of which the deploy line reads deploy/serve/strata.yaml: that file with its model
    # swapped for a CPU one whose replica (2 CPUs) fits only on the worker, as the head container gets 1 CPU.
    bootstrap = onprem | {"provider": onprem["provider"] | {"head_ip": head_host.ip, "worker_ips": []},
                          "min_workers": 0, "max_workers": 0}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(bootstrap))
    serve_config = yaml.safe_load((DEPLOY / "serve" / "strata.yaml").read_text())
    serve_config["applications"][0]["args"]["models"] = [
        {"model": "smollm2-135m-instruct", "device": "cpu", "num_cpus_per_replica": 2, "num_kv_blocks": 128}]
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "strata.yaml").write_text(yaml.safe_dump(serve_config))
    mounts = ["--volume", f"{tmp_path / 'ray_bootstrap_config.yaml'}:/home/ray/ray_bootstrap_config.yaml:ro",
              "--volume", f"{tmp_path / 'serve'}:/home/ray/strata/deploy/serve:ro"]
    for path in (tmp_path, tmp_path / "serve", tmp_path / "ray_bootstrap_config.yaml"):
        path.chmod(0o755)  # readable by the image's user

    # Ray's cluster launcher runs each line in a login shell; a container that idles until the lines run.
    idle = dict(entrypoint=["/usr/bin/tini", "--"], args=["sleep", "infinity"])
    head = network.start(image, head_host, env={}, options=["--cpus", "1", *mounts], **idle)
    worker = network.start(image, worker_host, env={"RAY_HEAD_IP": head_host.ip}, **idle)
    try:
        *start_lines, deploy_line = onprem["head_start_ray_commands"]
        for line in start_lines:
            out = containers.shell(head, line)
            assert "ray start" not in line or "Ray runtime started" in out.stdout, out.stdout + out.stderr
        for line in onprem["worker_start_ray_commands"]:
            out = containers.shell(worker, line)
            assert "ray start" not in line or "Ray runtime started" in out.stdout, out.stdout + out.stderr
        assert "~/strata/deploy/serve/strata.yaml" in deploy_line
        out = containers.shell(head, deploy_line, timeout=600)
        assert out.returncode == 0 and "deployed smollm2-135m-instruct" in out.stdout, out.stdout + out.stderr

        nodes = containers.shell(head, "ray list nodes --filter state=ALIVE --format json").stdout
        assert sorted(n["node_ip"] for n in json.loads(nodes)) == sorted([head_host.ip, worker_host.ip])
        apps = json.loads(containers.shell(head, "curl -s localhost:8265/api/serve/applications/").stdout)
        replicas = [r for app in apps["applications"].values() for name, d in app["deployments"].items()
                    for r in d["replicas"] if "smollm2" in name.lower() or "engine" in name.lower()]
        assert replicas and {r["node_ip"] for r in replicas} == {worker_host.ip}, json.dumps(apps)[-3000:]

        client = openai.OpenAI(base_url=f"http://{head_host.ip}:8000/v1", api_key="none", max_retries=0,
                               timeout=120)
        answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=16,
                                                temperature=0)
        assert answer.choices[0].message.content.strip() == "The capital of France is Paris."
    except BaseException:
        print(containers.logs(head), containers.shell(head, "tail -30 /tmp/ray/session_latest/logs/serve/*.log")
              .stdout, containers.logs(worker))
        raise

"""`strata serve` end to end, as `make serve` runs it: a Ray instance of its own, Serve's low-latency settings
(cluster/serve_env.py), the one ingress replica serving HTTP on --port itself; the openai client streams from it,
`strata deploy` redeploys it in place, and Ctrl-C stops it cleanly. Its console shows the URL, the model and
Strata's lines from the replicas, and Ray's and Serve's own INFO lines only with --log-level debug."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.support.cli import strata
from tests.support.polling import wait_for
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

# Ray's and Serve's log lines: "2026-01-02 03:04:05,678\tINFO worker.py:2038 -- Started a local Ray instance." and
# "(ServeController pid=1) INFO 2026-01-02 03:04:05,678 controller 1 -- Deploying new version of ...".
RAY_OR_SERVE_INFO = re.compile(r"\bINFO\b.* -- ")
# Strata's, from the engine replica's process: "(ServeReplica:strata:EngineReplica-demo pid=1) INFO 01-02 03:04:05 ..."
STRATA_INFO_FROM_THE_REPLICA = re.compile(r"\(ServeReplica:strata:EngineReplica-demo pid=\d+\)\S* INFO \d\d-\d\d ")


def start(port: int, log: Path, *flags: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "demo", "--port", str(port), "--num-kv-blocks", "64",
             "--max-num-seqs", "4", "--num-cpus-per-replica", "0.5", *flags],
            stdout=out, stderr=subprocess.STDOUT, text=True)


def stop_with_ctrl_c(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _models(port: int) -> list[str] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    except httpx.HTTPError:
        return None
    return [m["id"] for m in response.json()["data"]] if response.status_code == 200 else None


def _listener(port: int) -> str:
    """The command line of the process listening on `port`."""
    pid = next(c.pid for c in psutil.net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
    return " ".join(psutil.Process(pid).cmdline())


def test_strata_serve_streams_redeploys_in_place_and_stops_on_ctrl_c(tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    process = start(port, log)
    try:
        ready = f"Strata is serving demo at http://127.0.0.1:{port}"
        wait_for(lambda: ready in log.read_text() or process.poll() is not None, timeout=240,
                 what="strata serve to be ready")
        assert process.poll() is None, log.read_text()[-3000:]
        assert _models(port) == ["demo"]
        assert "OpenAIIngress" in _listener(port)  # not Serve's proxy: no hop between
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        chunks = list(client.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0,
                                                stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        whole = client.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0, n=3)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text

        # In place, with a limit the ingress enforces: the new ingress replica takes the port back, though a
        # client's kept-alive connection leaves the old one's side of it waiting to close (FIN-WAIT, TIME-WAIT).
        kept_alive = httpx.Client()
        assert kept_alive.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        address = re.search(r"Ray started at (\S+) ", log.read_text()).group(1)
        config = tmp_path / "strata.yaml"
        rendered = strata("config", "render", "demo", "--port", str(port), "--num-kv-blocks", "64",
                          "--max-num-seqs", "4", "--num-cpus-per-replica", "0.5", "--max-n", "2")
        config.write_text(rendered.stdout)
        deployed = strata("deploy", str(config), "--address", address, timeout=240, env={"RAY_AUTH_MODE": "token"})
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        with pytest.raises(openai.BadRequestError, match="n"):
            client.completions.create(model="demo", prompt="Hello", max_tokens=5, n=3)
        assert client.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0).choices[0].text \
            == whole.choices[0].text
        assert "OpenAIIngress" in _listener(port)
        kept_alive.close()
    finally:
        stop_with_ctrl_c(process)
    console = log.read_text()
    assert process.returncode == 0 and "stopping..." in console, console[-3000:]
    assert STRATA_INFO_FROM_THE_REPLICA.search(console), console[-3000:]
    assert not [line for line in console.splitlines() if RAY_OR_SERVE_INFO.search(line)], console[-3000:]


def test_log_level_debug_shows_ray_and_serve_info_lines(tmp_path):
    def serve_controller_info(console: str) -> list[str]:
        return [line for line in console.splitlines() if "(ServeController" in line and RAY_OR_SERVE_INFO.search(line)]

    port, log = free_port(), tmp_path / "serve.log"
    process = start(port, log, "--log-level", "debug")
    try:
        # The Serve controller deploys the app before the model loads: no need to wait for the model.
        wait_for(lambda: serve_controller_info(log.read_text()) or process.poll() is not None, timeout=240,
                 what="an INFO line of the Serve controller")
    finally:
        stop_with_ctrl_c(process)
    console = log.read_text()
    assert serve_controller_info(console) and "Started a local Ray instance" in console, console[-3000:]

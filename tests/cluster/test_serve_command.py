"""`strata serve` end to end, as `make serve` runs it: a Ray instance of its own, Serve's low-latency settings
(cluster/serve_env.py), here with the ingress serving HTTP on --port itself (--direct-ingress); the openai client
streams from it, and Ctrl-C stops it cleanly."""
from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import openai
import pytest
from cluster_testing import free_port, wait_for

pytestmark = pytest.mark.slow


def _models(port: int) -> list[str] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    except httpx.HTTPError:
        return None
    return [m["id"] for m in response.json()["data"]] if response.status_code == 200 else None


def test_strata_serve_with_direct_ingress_streams_and_stops_on_ctrl_c(tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "demo", "--port", str(port), "--direct-ingress",
             "--num-kv-blocks", "64", "--max-num-seqs", "4", "--num-cpus-per-replica", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        ready = f"Strata is serving demo at http://127.0.0.1:{port}"
        wait_for(lambda: ready in log.read_text() or process.poll() is not None, timeout=240,
                 what="strata serve to be ready")
        assert process.poll() is None, log.read_text()[-3000:]
        assert _models(port) == ["demo"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        chunks = list(client.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0,
                                                stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        whole = client.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "stopping..." in log.read_text(), log.read_text()[-3000:]

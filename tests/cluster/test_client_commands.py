"""The commands that talk to a server, against a served demo model. `strata chat` in a pseudo-terminal, as a
person uses it: each answer is the one the API gives for the whole conversation so far; /system, /reset, /exit,
Ctrl-D, Ctrl-C during an answer; without --url it starts its own server and stops it when the chat ends (here on
Ctrl-C).
`strata bench`: vllm bench serve's figures and JSON keys. Errors of both are one line."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import openai
import pexpect
import psutil
import pytest
import yaml

from cluster.chat import PROMPT
from cluster.config import ClusterConfig, ModelConfig
from tests.support.cli import strata
from tests.support.paths import ROOT
from tests.support.serve_app import deploy

pytestmark = pytest.mark.slow

API_KEY = "chat-key"
CONFIG = ClusterConfig(models=[ModelConfig(model="demo", num_kv_blocks=128, max_num_seqs=4)], api_keys=[API_KEY],
                       app_name="strata-chat")
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def spawn_chat(*args: str, timeout: float = 60, ignore_sigint: bool = False) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": str(ROOT)}  # dumb: readline writes no escape codes
    # The chat must not depend on how the test runner was started: SIGINT is set explicitly either way.
    disposition = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
    return pexpect.spawn(sys.executable, ["-m", "cluster.cli", "chat", *args], cwd=str(ROOT), env=env,
                         encoding="utf-8", codec_errors="replace", timeout=timeout, dimensions=(40, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))


def say(chat: pexpect.spawn, line: str) -> str:
    """Type a line, wait for the next prompt, and return what the chat wrote in between (the typed line's echo
    and the trailing newline left out)."""
    chat.sendline(line)
    chat.expect_exact(PROMPT)
    shown = chat.before.replace("\r\n", "\n")
    assert shown.startswith(line + "\n"), shown
    return shown.removeprefix(line + "\n").removesuffix("\n")


def test_a_conversation_with_system_prompt_and_reset(base_url):
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)

    def answer(*messages: dict) -> str:
        out = api.chat.completions.create(model="demo", messages=list(messages), **GREEDY)
        return out.choices[0].message.content

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    chat = spawn_chat("--url", base_url, "--api-key", API_KEY, "--temperature", "0", "--max-tokens", "12")
    chat.expect_exact("Chatting with demo")
    chat.expect_exact(PROMPT)
    first = say(chat, "Hello there")
    assert first and first == answer(user("Hello there"))
    second = say(chat, "Tell me more")  # the whole conversation goes with each message
    assert second == answer(user("Hello there"), {"role": "assistant", "content": first}, user("Tell me more"))
    assert say(chat, "/system You are a pirate.") == "(system prompt set)"
    system = {"role": "system", "content": "You are a pirate."}
    third = say(chat, "Ahoy")
    assert third == answer(system, user("Hello there"), {"role": "assistant", "content": first},
                           user("Tell me more"), {"role": "assistant", "content": second}, user("Ahoy"))
    assert say(chat, "/reset") == "(conversation cleared)"
    assert say(chat, "Ahoy") == answer(system, user("Ahoy"))  # the system prompt outlives /reset
    assert say(chat, "/system") == "(system prompt: You are a pirate.)"
    assert "unknown command /frobnicate" in say(chat, "/frobnicate")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


@pytest.mark.parametrize("sigint", ["default", "inherited ignored"])
def test_ctrl_c_during_an_answer_stops_that_answer_only(base_url, sigint):
    """Also where the chat inherits SIGINT ignored, as from the background of a non-interactive shell (Python then
    installs no KeyboardInterrupt handler of its own)."""
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    long = api.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                       max_tokens=1000)
    assert long.choices[0].finish_reason == "length"  # so the answer below is still being written when stopped
    chat = spawn_chat("--url", base_url, "--api-key", API_KEY, "--temperature", "0", "--max-tokens", "1000",
                      ignore_sigint=sigint == "inherited ignored")
    chat.expect_exact(PROMPT)
    chat.sendline("Hello")
    chat.expect_exact("Hello\r\n")
    chat.expect(r"\S")  # the answer has begun
    begun = chat.before + chat.after
    chat.sendintr()
    chat.expect_exact(" [stopped]\r\n" + PROMPT)
    shown = (begun + chat.before).replace("^C", "").replace("\r\n", "\n")  # the terminal echoes Ctrl-C as ^C
    assert long.choices[0].message.content.startswith(shown) and len(shown) < len(long.choices[0].message.content)
    assert say(chat, "/system") == "(system prompt: none)"  # still chatting
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_d_at_the_prompt_leaves_cleanly(base_url):
    chat = spawn_chat("--url", base_url, "--api-key", API_KEY)
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in chat.before, chat.before


@pytest.mark.parametrize("args, error", [
    (["chat", "--api-key", "wrong-key"], "strata chat: the server refused the API key"),
    (["chat", "no-such-model", "--api-key", API_KEY],
     "strata chat: the server has no model 'no-such-model'; it serves: demo"),
    (["bench", "--api-key", "wrong-key"], "strata bench: the server refused the API key"),
])
def test_errors_are_one_line(base_url, args, error):
    out = strata(*args, "--url" if args[0] == "chat" else "--base-url", base_url)
    assert out.returncode == 1 and out.stderr.startswith(error), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_unreachable_server_is_one_line(tmp_path):
    out = strata("chat", "--url", "http://127.0.0.1:1")
    assert out.returncode == 1, out
    assert out.stderr.strip() == "strata chat: cannot reach the server at http://127.0.0.1:1/v1 ([Errno 111] " \
                                 "Connection refused)"


def test_a_local_server_that_fails_is_one_line_and_keeps_its_log():
    out = strata("chat", "./no/such/model")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    found = re.fullmatch(r"strata chat: the local server stopped: strata: error: model directory './no/such/model' "
                         r"does not exist \(its log: (\S+)\)", out.stderr.strip())
    assert found, out.stderr
    log = Path(found[1])
    assert "does not exist" in log.read_text()
    log.unlink()


def test_without_url_it_serves_the_model_itself_and_stops_it_on_ctrl_c(tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({"models": [{"model": "demo", "num_kv_blocks": 64, "max_num_seqs": 4,
                                                  "num_cpus_per_replica": 0.5}]}))
    chat = spawn_chat("--config", str(config), "--max-tokens", "4", timeout=240)  # the model: the config's
    try:
        chat.expect(r"Chatting with demo at http://127\.0\.0\.1:(\d+)")
        port = int(chat.match.group(1))
        chat.expect_exact(PROMPT)
        assert say(chat, "Hello")
        servers = [p for p in psutil.process_iter(["cmdline"])
                   if re.search(rf"cluster\.cli serve .*--port {port}\b", " ".join(p.info["cmdline"] or []))]
        assert len(servers) == 1
        chat.sendintr()  # Ctrl-C at the prompt: the chat ends, and waits for its server to stop
        chat.expect(pexpect.EOF, timeout=90)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0 and "Traceback" not in chat.before, chat.before
    assert not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE


def test_bench_reports_vllms_figures(base_url, tmp_path):
    out = strata("bench", "--base-url", base_url, "--api-key", API_KEY, "--num-prompts", "6", "--random-input-len",
                 "16", "--random-output-len", "5", "--max-concurrency", "3", "--goodput", "ttft:600000", "e2el:600000",
                 "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
                 "--result-dir", str(tmp_path), "--result-filename", "bench.json", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Serving Benchmark Result" in out.stdout and "P99 TTFT (ms):" in out.stdout, out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["model_id"], result["completed"], result["failed"], result["max_concurrency"]) == ("demo", 6, 0, 3)
    assert result["input_lens"] == [16] * 6 and result["output_lens"] == [5] * 6 and result["errors"] == [""] * 6
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (6 * 16, 6 * 5)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # every request met the SLOs
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"p50_{metric}_ms"] <= result[f"p99_{metric}_ms"], metric
        assert result[f"median_{metric}_ms"] == result[f"p50_{metric}_ms"] and f"std_{metric}_ms" in result
    assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]

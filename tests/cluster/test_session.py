"""RequestSession's one retry loop, against a real engine replica in this process (no Ray): a request goes to
replicas at most `request_retries + 1` times in all, and a request that succeeds comes back whole or streamed."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from cluster.config import LimitsConfig, ModelConfig
from cluster.errors import APIError
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint
from cluster.protocol import CompletionRequest
from cluster.responses import ResponseBuilder
from cluster.session import RequestSession

LIMITS = LimitsConfig()


class CountingEndpoint(LocalModelEndpoint):
    """The model's replica in this process, counting the requests sent to it."""

    sent = 0

    def _call(self, request):
        self.sent += 1
        return super()._call(request)


@pytest.fixture(scope="module")
def metrics():
    return ServingMetrics()


def session(endpoint, metrics, **body) -> RequestSession:
    request = CompletionRequest(model="demo", **body)
    params = request.to_sampling_params(LIMITS)
    prompts = [endpoint.prompt(p) for p in request.prompts(LIMITS)]
    return RequestSession(endpoint, request, ResponseBuilder("completion", "cmpl-test", "demo", prompts, params.n),
                          params, metrics)


def test_whole_and_streamed_answers_carry_the_same_tokens(metrics):
    endpoint = CountingEndpoint(ModelConfig(model="demo", num_kv_blocks=64, max_num_seqs=4), LIMITS)
    body = dict(prompt="Hello", max_tokens=8, temperature=0, ignore_eos=True)

    async def main():
        whole = json.loads((await session(endpoint, metrics, **body).respond(stream=False)).body)
        streamed = await session(endpoint, metrics, **body, stream=True).respond(stream=True)
        events = [e async for e in streamed.body_iterator]
        return whole, events

    try:
        whole, events = asyncio.run(main())
    finally:
        endpoint.replica.engine.shutdown()
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e != "data: [DONE]\n\n"]
    assert events[-1] == "data: [DONE]\n\n"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] == 8 and endpoint.sent == 2


def test_a_failing_replica_gets_the_request_retries_plus_one_times_in_all(metrics):
    """The replica's engine (its own process) is killed: every attempt is refused as `engine down`, which is
    the replica's failure, not the request's; the session tries `request_retries + 1` times, then answers 503."""
    config = ModelConfig(model="demo", num_kv_blocks=64, max_num_seqs=4, engine_core_process=True,
                         request_retries=2)
    endpoint = CountingEndpoint(config, LIMITS)
    process = endpoint.replica.engine._loop._process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    try:
        with pytest.raises(APIError) as error:
            asyncio.run(session(endpoint, metrics, prompt=["a", "b"], max_tokens=4).respond(stream=False))
    finally:
        endpoint.replica.engine.shutdown()
    assert error.value.status == 503 and "tried 3 times" in error.value.message
    assert endpoint.sent == 3, "one attempt of the first prompt per try: the failure ends each try"

"""Agent frameworks against a real server: LangChain and the OpenAI Agents SDK, unchanged, on Ray Serve over HTTP
with the random demo model. Their structured outputs and forced tool calls come back valid only because the
server constrains the decoding to the schemas they send."""
from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Literal

import pydantic
import pytest
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI

from cluster.config import ClusterConfig, ModelConfig
from tests.support.serve_app import deploy

API_KEY = "agent-key"
# The demo template writes no tool calls: naming the hermes parser lets requests with tools and tool_choice
# "auto" through (the random model never writes <tool_call>, so such answers are content).
CONFIG = ClusterConfig(models=[ModelConfig(model="demo", num_kv_blocks=256, max_num_seqs=8, tool_call_parser="hermes")],
                       api_keys=[API_KEY], app_name="strata-agents")


class Forecast(pydantic.BaseModel):
    """The weather in one city."""

    city: str = pydantic.Field(max_length=8)
    celsius: int = pydantic.Field(ge=-40, le=50)
    sky: Literal["clear", "cloudy", "rain"]


class Add(pydantic.BaseModel):
    """Add two small numbers."""

    a: int = pydantic.Field(ge=0, le=99)
    b: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def test_langchain_structured_output_returns_the_pydantic_object(base_url):
    llm = ChatOpenAI(model="demo", base_url=f"{base_url}/v1", api_key=API_KEY, max_tokens=120, temperature=1.0,
                     seed=3, max_retries=0, timeout=120)
    out = llm.with_structured_output(Forecast, method="json_schema").invoke("The weather in Paris?")
    assert isinstance(out, Forecast)


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_forced_tool_call_has_valid_arguments(base_url, stream):
    llm = ChatOpenAI(model="demo", base_url=f"{base_url}/v1", api_key=API_KEY, max_tokens=120, temperature=1.0,
                     seed=3, max_retries=0, timeout=120).bind_tools([Add], tool_choice="Add")
    message = reduce(operator.add, llm.stream("What is 2 + 3?")) if stream else llm.invoke("What is 2 + 3?")
    (call,) = message.tool_calls
    assert call["name"] == "Add" and call["id"]
    Add.model_validate(call["args"])


def test_openai_agents_sdk_agent_calls_its_tool_then_returns_its_output_type(base_url):
    """A whole agent loop over chat completions: the first turn must call `add` (tool_choice), the SDK runs it and
    sends its result back; the next turn (tool_choice reset to auto, as the SDK does) answers with the output
    type, under its json_schema."""
    ran = []

    @function_tool
    def add(a: Annotated[int, pydantic.Field(ge=0, le=99)], b: Annotated[int, pydantic.Field(ge=0, le=99)]) -> int:
        """Add two small numbers."""
        ran.append((a, b))
        return a + b

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    agent = Agent(name="forecaster", instructions="Add, then answer with the forecast.", output_type=Forecast,
                  tools=[add], model=OpenAIChatCompletionsModel(model="demo", openai_client=client),
                  model_settings=ModelSettings(tool_choice="add", max_tokens=120, temperature=1.0))
    result = Runner.run_sync(agent, "The weather in Paris?", max_turns=3)
    assert isinstance(result.final_output, Forecast)
    assert len(ran) == 1 and all(0 <= n <= 99 for n in ran[0])

"""The API's ways of asking for structured output, as the engine's one `StructuredOutputsParams`.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` object and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` / `structural_tag` fields, and the JSON schema
that forces a tool call (`tool_choice` "required" or a named function, as vLLM builds it)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import APIError
from engine import InvalidRequestError, StructuredOutputsParams


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # structural_tag's own fields
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputFields(BaseModel):
    """The request fields, shared by completions and chat."""

    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: one of json, json_object, regex, choice, grammar, structural_tag.")
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None

    def structured_output_params(self) -> StructuredOutputsParams | None:
        """The one constraint this request asks for, or None; APIError(400) for two, or for a malformed one."""
        asked = self._asked()
        if not asked:
            return None
        if len(asked) > 1:
            raise APIError(400, f"ask for one structured output at a time, got {', '.join(f for f, _ in asked)}",
                           param=asked[1][0])
        field, spec = asked[0]
        unknown = sorted(set(spec) - set(StructuredOutputsParams.__dataclass_fields__))
        if unknown:
            raise APIError(400, f"{field} takes one of json, json_object, regex, choice, grammar or structural_tag; "
                                f"got {', '.join(unknown)}", param=field)
        try:
            return StructuredOutputsParams(**spec)
        except InvalidRequestError as e:
            raise APIError(400, e.message, param=field) from None

    @property
    def structured_output_field(self) -> str | None:
        """The request field that asked for structured output, to name in errors."""
        asked = self._asked()
        return asked[0][0] if asked else None

    def _asked(self) -> list[tuple[str, dict]]:
        asked: list[tuple[str, dict]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            asked.append(("response_format", {"json": fmt.json_schema.json_schema}))
        elif fmt is not None and fmt.type == "structural_tag":
            asked.append(("response_format", {"structural_tag": fmt.model_dump(exclude={"type", "json_schema"})}))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", self.structured_outputs))
        for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar"), ("structural_tag", "structural_tag")):
            if getattr(self, field) is not None:
                asked.append((field, {key: getattr(self, field)}))
        return asked


def forced_tool_call_schema(tools: list[dict], tool_choice: str | dict, parallel: bool | None) -> dict:
    """The JSON the model must write when it must call a tool: the named function's arguments, or (required) a
    list of {"name", "parameters"} calls of any of the tools."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return tool["function"].get("parameters") or {"type": "object"}
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"]} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema

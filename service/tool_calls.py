"""Function calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

The tools are written into the prompt (service/tool_format.py) and the answer is read back for calls:
- tool_choice "auto" (the default with tools): the model answers freely, but a call block it opens is held by
  grammar to a call of one of the tools with valid arguments; the call blocks become the message's `tool_calls`,
  the rest its `content`;
- "required": the output is held by a grammar (service/structured.py) to one call block or more (exactly one
  with parallel_tool_calls false), each naming one of the tools with arguments that follow its parameters' schema;
- {"type": "function", "function": {"name": …}}: the same, one call of that function;
- "none": the tools are still shown to the model (as vLLM does) but nothing is read as a call.
A message with calls ends with finish_reason "tool_calls" (unless max_tokens cut it: "length"; a call it cut keeps
its arguments as far as they got, as vLLM's do). Streamed, content comes as it is generated; each call starts with
a delta holding its id and name as soon as the name is written and its arguments follow in pieces as they are
generated (when a response_format holds the answer instead, each call comes whole once its block closes).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import engine as eng
from service import tool_format
from service.errors import ApiError
from service.structured import Constraint

Mode = Literal["none", "auto", "required", "named"]


# --- request shapes (OpenAI's) -----------------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=tool_format.NAME_PATTERN.pattern, description="1–64 characters of a-z, A-Z, 0-9, _ and -")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="a JSON schema of the arguments object (none: a function without arguments)")
    strict: bool | None = Field(default=None, description="accepted; the arguments always follow the schema here")


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict[str, Any] = Field(default="{}", description="the arguments object as JSON text (or an object)")


class ToolCallIn(BaseModel):
    """A call in an assistant turn of the history."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_value", message, param=param)


def _unknown_choice(tool_choice: Any) -> ApiError:
    return _bad("tool_choice", f"tool_choice {tool_choice!r} is not 'none', 'auto', 'required' or "
                               "{'type': 'function', 'function': {'name': …}}")


@dataclass(frozen=True)
class ToolPlan:
    """What a request asked of its tools: the functions (checked), how the answer may call them."""

    functions: list[dict[str, Any]]
    mode: Mode
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[ToolDefinition] | list[dict[str, Any]] | None, tool_choice: ToolChoice | dict | None,
           parallel_tool_calls: bool | None) -> "ToolPlan | None":
        """The request's plan; None without tools (and a tool_choice that needs none); 400 for a bad one."""
        raw = [t.model_dump(exclude_none=True) if isinstance(t, BaseModel) else t for t in tools or []]
        try:
            functions = tool_format.check_tools(raw) if raw else []
        except tool_format.ToolFormatError as exc:
            raise _bad("tools", str(exc)) from None
        parallel = parallel_tool_calls is not False
        if isinstance(tool_choice, dict):
            try:
                tool_choice = NamedToolChoice.model_validate(tool_choice)
            except ValidationError:
                raise _unknown_choice(tool_choice) from None
        if tool_choice in (None, "auto", "none"):
            if not functions:
                return None
            return cls(functions, "none" if tool_choice == "none" else "auto", parallel=parallel)
        if isinstance(tool_choice, NamedToolChoice):
            mode, name = "named", tool_choice.function.name
        elif tool_choice == "required":
            mode, name = "required", None
        else:
            raise _unknown_choice(tool_choice)
        shown = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump()
        if not functions:
            raise _bad("tool_choice", f"tool_choice {shown!r} needs tools; give the functions in 'tools'")
        if name is not None and name not in {f["name"] for f in functions}:
            raise _bad("tool_choice", f"tool_choice names {name!r}, which is not among the tools "
                                      f"({', '.join(f['name'] for f in functions)})")
        return cls(functions, mode, name, parallel)

    @property
    def reads_calls(self) -> bool:
        return self.mode != "none"

    def constraint(self) -> Constraint | None:
        """The grammar the answer is held to. "required" and a named choice: call blocks only (one without
        parallel calls), each calling one of the allowed functions with arguments that follow its parameters'
        schema. "auto": free text, but once the model opens a call block the block must be such a call (a
        lexeme ending with the opening tag hands over to the call's rule), so no malformed call reaches the
        client; without parallel calls, nothing after one call. "none": no grammar."""
        if self.mode == "none":
            return None
        allowed = [f for f in self.functions if self.mode != "named" or f["name"] == self.name]
        defs: dict[str, Any] = {}
        calls = []
        for f in allowed:
            params, own = _hoisted(f["name"], f["parameters"])
            defs.update(own)
            calls.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                          "required": ["name", "arguments"], "additionalProperties": False})
        schema = {"anyOf": calls} if len(calls) > 1 else dict(calls[0])
        if defs:
            schema["$defs"] = defs
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": tool_format.ITEM_SEPARATOR,
                                "key_separator": tool_format.KEY_SEPARATOR}
        opening, closing = tool_format.CALL_OPEN, tool_format.CALL_CLOSE
        if self.mode == "auto":
            start = "start: (text after_open)* free" if self.parallel else "start: text after_open | free"
            rules = (f'{start}\ntext[suffix="{opening}"]: /(.|\\n)*/\nfree: /(.|\\n)*/\n'
                     f'after_open: "\\n" args "\\n{closing}"\n')
        else:
            more = ' ("\\n" call)*' if self.parallel and self.mode == "required" else ""
            rules = f'start: call{more}\ncall: "{opening}\\n" args "\\n{closing}"\n'
        return Constraint("lark", f"{rules}args: %json {json.dumps(schema, ensure_ascii=False)}\n", "tool_choice")


def _hoisted(name: str, parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A function's parameters schema with its own definitions ($defs / definitions, as pydantic writes nested
    models) moved out to the call grammar's root, renamed "<function>.<definition>" and every reference to them
    rewritten: nested under a call, "#/$defs/…" would otherwise point at the grammar's root, and two functions may
    each define a "Location"."""
    params = json.loads(json.dumps(parameters))  # a deep copy the rewrite may change
    found = {**params.pop("definitions", {}), **params.pop("$defs", {})}
    if not found:
        return params, {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            for prefix in ("#/$defs/", "#/definitions/"):
                if isinstance(ref, str) and ref.startswith(prefix):
                    node = {**node, "$ref": f"#/$defs/{name}.{ref[len(prefix):]}"}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return rewrite(params), {f"{name}.{key}": rewrite(d) for key, d in found.items()}


def _call_entry(call: tool_format.ToolCall, index: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                             "function": {"name": call.name, "arguments": call.arguments}}
    return entry if index is None else {"index": index, **entry}


def _finish(reason: str, called: bool) -> str:
    return "tool_calls" if called and reason == "stop" else reason


def message(plan: ToolPlan | None, result: eng.GenerationResult, incremental: bool = False) -> tuple[dict[str, Any], str]:
    """A whole answer → (its chat message, its finish_reason); `incremental` as for `StreamedChoice`."""
    if plan is None or not plan.reads_calls:
        return {"role": "assistant", "content": result.text, "refusal": None}, result.finish_reason
    content, calls = tool_format.parse(result.text, incremental)
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        msg["tool_calls"] = [_call_entry(c) for c in calls]
    return msg, _finish(result.finish_reason, bool(calls))


class StreamedChoice:
    """One streamed choice's deltas when calls are read: content as it can be shown; each call when its block
    closes, or — `incremental`, when the server's grammar holds the calls — its name as soon as it is written and
    its arguments as they are generated (as vLLM streams them). Log-probabilities of tokens held back (a call
    block, or what may start one) ride on the next delta."""

    def __init__(self, incremental: bool = False) -> None:
        self.stream = tool_format.CallStream(incremental)
        self.calls = 0
        self.held: list[eng.TokenLogprob] = []

    def delta(self, shown: str, pieces: list[tool_format.CallPiece]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if shown:
            d["content"] = shown
        entries = []
        for piece in pieces:
            if piece.start:  # a new call: its id, type and name (and its arguments, when they come whole)
                entries.append(_call_entry(tool_format.ToolCall(piece.name or "", piece.arguments), self.calls))
                self.calls += 1
            else:
                entries.append({"index": self.calls - 1, "function": {"arguments": piece.arguments}})
        if entries:
            d["tool_calls"] = entries
        return d

    def feed(self, text: str, entries: list[eng.TokenLogprob] | None) -> tuple[dict[str, Any], list | None] | None:
        """(delta, its tokens' log-probabilities) to send now, or None while everything is held."""
        self.held += entries or []
        d = self.delta(*self.stream.feed(text))
        if not d:
            return None
        out, self.held = self.held, []
        return d, (out if entries is not None else None)

    def finish(self, reason: str) -> tuple[dict[str, Any], list[eng.TokenLogprob], str]:
        """The last delta (whatever was held), the log-probabilities still held, the finish_reason."""
        d = self.delta(*self.stream.finish())
        out, self.held = self.held, []
        return d, out, _finish(reason, self.calls > 0)

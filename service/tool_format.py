"""Function calling's text format: tools and tool calls written into a chat, and tool calls read back out of text.

One format everywhere, the Hermes one (what Qwen2.5 and NousResearch's Hermes models are trained on): the tools'
JSON signatures in the system turn between <tools></tools>, each call the model makes as
`<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, and each tool's result as a user turn between
<tool_response></tool_response>. The server renders requests this way whatever the base model's own chat template
says (the default model's has no tools), and the trainer renders tool-calling data the same way
(training/data.py), so an adapter trained on it answers in the format the server parses.

Pure functions and one small stream parser, no web imports: the trainer uses this module too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# json.dumps's default separators: the trainer writes calls with them and the server's grammar keeps them.
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

_TOOLS_PREAMBLE = (
    "You can call functions to help with the user's request. Their signatures, one JSON object a line, are "
    "between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with a JSON object holding its name and its arguments between <tool_call> and "
    "</tool_call>, one block a call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>'
)


class ToolFormatError(ValueError):
    """A tool, a tool call or a message the format cannot carry; the message says which and why."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI's API carries it


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call as the model writes it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                      separators=(ITEM_SEPARATOR, KEY_SEPARATOR))
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def assistant_text(content: str | None, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """An assistant turn: its text (if any), then its calls, one block a line."""
    parts = [content.strip()] if content and content.strip() else []
    return "\n".join(parts + [call_text(n, a) for n, a in calls])


def tools_system_text(functions: list[dict[str, Any]]) -> str:
    """The system turn's part that lists the tools (each {"name", "description"?, "parameters"?})."""
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return _TOOLS_PREAMBLE.format(tools=lines)


def check_function(fn: Any, where: str) -> dict[str, Any]:
    """A tool's function definition, checked: {"name", "description"?, "parameters"?} with a valid name and a
    JSON-schema object for parameters (an object with no properties when absent)."""
    if not isinstance(fn, dict):
        raise ToolFormatError(f"{where}: a function must be an object with a 'name'")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolFormatError(f"{where}.name: {name!r} is not a function name (1–64 characters of a-z, A-Z, 0-9, "
                              "_ and -)")
    if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
        raise ToolFormatError(f"{where}.description must be a string")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ToolFormatError(f"{where}.parameters must be a JSON schema (an object)")
    out = {"name": name, "parameters": params}
    if fn.get("description"):
        out = {"name": name, "description": fn["description"], "parameters": params}
    return out


def check_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """OpenAI's `tools` list → the functions, checked (type "function", unique names)."""
    if not isinstance(tools, list) or not tools:
        raise ToolFormatError(f"{where} must be a non-empty list of {{'type': 'function', 'function': {{...}}}}")
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolFormatError(f"{where}[{i}]: only tools of type 'function' are supported")
        fn = check_function(tool.get("function"), f"{where}[{i}].function")
        if fn["name"] in seen:
            raise ToolFormatError(f"{where}[{i}].function.name: {fn['name']!r} is defined twice")
        seen.add(fn["name"])
        functions.append(fn)
    return functions


def _arguments(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A history turn's call ({"function": {"name", "arguments": JSON text or object}}) → (name, arguments)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolFormatError(f"{where}: a tool call is {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolFormatError(f"{where}.function.arguments is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(args, dict):
        raise ToolFormatError(f"{where}.function.arguments must be a JSON object")
    return fn["name"], args


def plain_turns(messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """A chat with tools, tool calls and tool results → plain {role, content} turns any chat template renders:
    the tools' list joins the system turn (one is added when the chat has none), an assistant's calls become
    call blocks in its text, and tool results (consecutive ones together) a user turn of <tool_response>s."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [_arguments(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
            out.append({"role": "assistant", "content": assistant_text(content, calls)})
        elif role in ("tool", "function"):
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": "1"})
        else:
            out.append({"role": role, "content": content})
    turns = [{"role": t["role"], "content": t["content"]} for t in out]
    if functions:
        listing = tools_system_text(functions)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{listing}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": listing})
    return turns


# How a call held by the server's grammar begins (service/tool_calls.py): its arguments can stream from here on.
_HEADER = re.compile(r'\s*\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": (?=\{)')


def _parse_call(block: str) -> ToolCall | None:
    """The JSON between a call's tags → a ToolCall; None if it is not {"name": str, "arguments": object}. The
    arguments are the text the model wrote when the call begins as the grammar writes it (so streamed fragments
    add up to them), else the object re-serialized."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    header = _HEADER.match(block)
    if header and header.group(1) == obj["name"] and isinstance(obj.get("arguments"), dict):
        return ToolCall(obj["name"], _arguments_at(block, header.end()))
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _arguments_at(block: str, at: int) -> str:
    """A call's arguments as written, from `at` (just after its header): the JSON object there, or — max_tokens
    cut it before the object closed — everything written after the header."""
    try:
        return block[at:json.JSONDecoder().raw_decode(block, at)[1]]
    except json.JSONDecodeError:
        return block[at:]


@dataclass(frozen=True)
class CallPiece:
    """Part of a call as it streams: a call's start (its name; with `incremental`, arguments follow in pieces) or
    more of the current call's arguments text."""

    start: bool
    name: str | None
    arguments: str


class CallStream:
    """Reads a generation's text as it streams: `feed` answers the content that can be shown so far and the call
    pieces known so far; `finish` the rest. Content never includes a call block, nor the whitespace around one.

    Without `incremental`, each call comes whole once its block closes, and a block that does not parse (bad JSON,
    or cut off by max_tokens) stays in the content as text, so nothing the model wrote is lost. With it (the answer
    is held by the server's call grammar, so every block is a well-formed call unless max_tokens cuts it), a call
    starts as soon as its name is written and its arguments follow as they are generated; a cut call stays a call
    with its arguments cut. Fed whole or in any pieces, the same content and calls come out (`parse`)."""

    def __init__(self, incremental: bool = False) -> None:
        self.incremental = incremental
        self._pending = ""  # text not yet classified: maybe the start of a call, or whitespace before one
        self._inside = False  # in a call block (its text so far is in _pending)
        self._gap = ""  # the whitespace before the block: shown again if the block is not a call
        self._after_call = False  # whitespace right after a call is dropped
        self._shown = False  # some content was shown: content resuming after a call starts on a new line
        self._args_at: int | None = None  # incremental: where the open call's arguments begin in _pending
        self._args_sent = 0  # … and how many of their characters were sent

    def _show(self, out: list[str], text: str) -> None:
        if text:
            if self._after_call and self._shown:
                text = "\n" + text
            out.append(text)
            self._shown, self._after_call = True, False

    def _stream_arguments(self, pieces: list[CallPiece]) -> None:
        """Incremental: the open call's start once its name is complete, then its arguments written so far but
        for what may be the block's end."""
        if self._args_at is None:
            header = _HEADER.match(self._pending)
            if header is None:
                return
            self._args_at, self._args_sent = header.end(), 0
            pieces.append(CallPiece(True, header.group(1), ""))
        args = self._pending[self._args_at:]
        # held back: what may still turn out to be the call's end — a start of the closing tag, and the braces and
        # whitespace before it (the call object's own closing brace is among them)
        ready = len(args[:len(args) - _tag_start_len(args, CALL_CLOSE)].rstrip("} \t\r\n"))
        if ready > self._args_sent:
            pieces.append(CallPiece(False, None, args[self._args_sent:ready]))
            self._args_sent = ready

    def _end_block(self, raw: str, closing: str, shown: list[str], pieces: list[CallPiece]) -> None:
        """A call block's end: `raw` its text after the opening tag, `closing` the tag that ended it ("" when the
        generation did)."""
        call = _parse_call(raw.strip())
        if self._args_at is not None:  # incremental: the rest of its arguments (as _parse_call cuts them)
            args = _arguments_at(raw, self._args_at)
            if len(args) > self._args_sent:
                pieces.append(CallPiece(False, None, args[self._args_sent:]))
            self._args_at, self._after_call = None, True
        elif call is None:  # not a call: the text as written
            self._show(shown, self._gap + CALL_OPEN + raw + closing)
        else:
            pieces.append(CallPiece(True, call.name, call.arguments))
            self._after_call = True

    def feed(self, text: str) -> tuple[str, list[CallPiece]]:
        shown: list[str] = []
        pieces: list[CallPiece] = []
        self._pending += text
        while True:
            if self._inside:
                end = self._pending.find(CALL_CLOSE)
                if end < 0:
                    if self.incremental:
                        self._stream_arguments(pieces)
                    return "".join(shown), pieces
                raw = self._pending[:end]
                self._pending, self._inside = self._pending[end + len(CALL_CLOSE):], False
                self._end_block(raw, CALL_CLOSE, shown, pieces)
                continue
            if self._after_call:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return "".join(shown), pieces
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                before = self._pending[:start]
                self._show(shown, before.rstrip())
                self._gap = before[len(before.rstrip()):]
                self._pending, self._inside = self._pending[start + len(CALL_OPEN):], True
                continue
            # hold back trailing whitespace and whatever could be the start of "<tool_call>"
            keep = _tag_start_len(self._pending, CALL_OPEN)
            head, tail = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
            stripped = head.rstrip()
            self._show(shown, stripped)
            self._pending = head[len(stripped):] + tail
            return "".join(shown), pieces

    def finish(self) -> tuple[str, list[CallPiece]]:
        """What is left at the end: a call block never closed is tried as a call (EOS may come where the closing
        tag would); else, incrementally streamed, its arguments as far as they got; else it is shown as text."""
        rest, self._pending = self._pending, ""
        shown: list[str] = []
        pieces: list[CallPiece] = []
        if self._inside:
            self._inside = False
            self._end_block(rest, "", shown, pieces)
        else:
            self._show(shown, rest.rstrip())
        return "".join(shown), pieces


def calls_of(pieces: list[CallPiece]) -> list[ToolCall]:
    """Streamed pieces put together into calls."""
    calls: list[list[str]] = []
    for p in pieces:
        if p.start:
            calls.append([p.name or "", p.arguments])
        elif calls:
            calls[-1][1] += p.arguments
    return [ToolCall(name, args) for name, args in calls]


def _tag_start_len(text: str, tag: str) -> int:
    """How many trailing characters of text could be the start of `tag` (the tag may yet follow in full)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def parse(text: str, incremental: bool = False) -> tuple[str | None, list[ToolCall]]:
    """A whole generation → (its content, None when empty; its calls), as `CallStream` reads it streamed."""
    stream = CallStream(incremental)
    shown, pieces = stream.feed(text)
    rest, more = stream.finish()
    content = shown + rest
    return (content or None), calls_of(pieces + more)

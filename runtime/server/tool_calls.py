"""Tool calling on the wire: `tools` / `tool_choice` validation, and the `<tool_call>` blocks of
generated text parsed into OpenAI's `tool_calls` (whole, or as streamed deltas).

The model writes calls the way Qwen3-VL's chat template teaches it (and the grammar of
`tool_choice` "required" or a named function forces):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

`ToolCallParser` takes the answer's text piece by piece: text outside blocks is content, a tag
never shows, and a block becomes one call: its id, name and an empty arguments string as soon as
the name is known, then arguments chunks as they arrive (up to the last `}` seen, which may be
the outer object's end), the rest when `</tool_call>` closes it. The non-streamed answer runs the
same parser over the whole text, so both carry the same calls and the same arguments text.
A block whose JSON is not a call (only possible with "auto") is content, tags included.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from runtime.api import Grammar, InvalidRequest
from runtime.constrained import json_schema_grammar, tool_call_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
CHOICES = ("auto", "none", "required")


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for this answer."""
    tools: tuple[dict, ...] = ()          # rendered by the chat template (none when choice "none")
    choice: str = "none"                  # "auto", "none", "required" or "function"
    grammar: Grammar | None = None        # "required" / a named function: the forced call
    parse: bool = False                   # look for <tool_call> blocks in the answer


def _tool(t: Any, i: int) -> tuple[str, dict]:
    where = f"tools[{i}]"
    if not isinstance(t, dict):
        raise InvalidRequest(f"{where} must be an object")
    if t.get("type") != "function":
        raise InvalidRequest(f"{where}.type must be 'function'")
    f = t.get("function")
    if not isinstance(f, dict):
        raise InvalidRequest(f"{where}.function must be an object")
    name = f.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(f"{where}.function.name must be 1-64 letters, digits, _ or -")
    if f.get("description") is not None and not isinstance(f["description"], str):
        raise InvalidRequest(f"{where}.function.description must be a string")
    params = f.get("parameters", {"type": "object"})
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}.function.parameters must be a JSON Schema object")
    if params.get("type", "object") != "object":
        raise InvalidRequest(f"{where}.function.parameters must describe an object "
                             "(type 'object')")
    if f.get("strict") is not None and not isinstance(f["strict"], bool):
        raise InvalidRequest(f"{where}.function.strict must be a boolean")
    json_schema_grammar(params, f"{where}.function.parameters")      # llguidance accepts it
    return name, params or {"type": "object"}


def parse_tools(body: dict) -> ToolPlan:
    """Validate tools, tool_choice and parallel_tool_calls (errors name the field)."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of function tools")
    specs = [_tool(t, i) for i, t in enumerate(tools)]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if specs else "none"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise InvalidRequest(f"tool_choice must be one of {', '.join(CHOICES)} or "
                                 '{"type": "function", "function": {"name": ...}}')
        if choice == "none" or not specs:
            if choice == "required":
                raise InvalidRequest("tool_choice 'required' needs tools")
            return ToolPlan()
        if choice == "auto":
            return ToolPlan(tuple(tools), "auto", None, True)
        return ToolPlan(tuple(tools), "required",
                        tool_call_grammar(specs, parallel, "tools"), True)
    if not isinstance(choice, dict) or choice.get("type") != "function" \
            or not isinstance(choice.get("function"), dict) \
            or not isinstance(choice["function"].get("name"), str):
        raise InvalidRequest('tool_choice must be a string or {"type": "function", "function": '
                             '{"name": ...}}')
    name = choice["function"]["name"]
    if name not in names:
        raise InvalidRequest(f"tool_choice.function.name {name!r} is not one of the tools")
    spec = specs[names.index(name)]
    return ToolPlan(tuple(tools), "function", tool_call_grammar([spec], False, "tools"), True)


@dataclasses.dataclass
class _Call:
    index: int
    id: str
    name: str = ""
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental: feed() the answer's text, then finish(). Each returns a list of events:
    ("content", text) or ("call", {"index", "id"?, "name"?, "arguments"}) deltas."""

    def __init__(self):
        self.calls: list[_Call] = []
        self._buf = ""                 # text not yet handed out
        self._block: str | None = None   # inside a block: its text so far (tags excluded)
        self._call: _Call | None = None  # the block's call, once its name is known
        self._sent = 0                 # characters of the block's arguments already handed out
        self._args_at = 0
        self._after_call = False       # whitespace right after a call (the "\n" between calls) is no content

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if self._block is None:
                if self._after_call:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        return events
                    self._after_call = False
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _held_prefix(self._buf, OPEN)
                    out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    if out:
                        events.append(("content", out))
                    return events
                if at:
                    events.append(("content", self._buf[:at]))
                self._block, self._buf = "", self._buf[at + len(OPEN):]
                continue
            at = self._buf.find(CLOSE)
            if at < 0:
                keep = _held_prefix(self._buf, CLOSE)
                self._block += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                events += self._progress()
                return events
            self._block += self._buf[:at]
            self._buf = self._buf[at + len(CLOSE):]
            events += self._close()
            self._after_call = bool(self.calls)

    def _progress(self) -> list[tuple[str, Any]]:
        """Inside a block: the call's head once the name is known, then argument chunks."""
        events: list[tuple[str, Any]] = []
        if self._call is None:
            m = _HEAD.match(self._block)
            if m is None:
                return events
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                return events
            self._call = _Call(len(self.calls), new_call_id(), name)
            self._args_at, self._sent = m.end(), 0
            events.append(("call", {"index": self._call.index, "id": self._call.id,
                                    "name": name, "arguments": ""}))
        args = self._block[self._args_at:]
        end = args.rfind("}")               # it may be the outer object's: hold it back
        if end > self._sent:
            events.append(self._args(args[self._sent:end]))
            self._sent = end
        return events

    def _args(self, chunk: str) -> tuple[str, Any]:
        self._call.arguments += chunk
        return ("call", {"index": self._call.index, "arguments": chunk})

    def _close(self) -> list[tuple[str, Any]]:
        events = self._progress() if self._call is None else []
        block, self._block = self._block, None
        call, self._call = self._call, None
        if call is not None:                # streamed so far: the rest of the arguments text
            body = block[self._args_at:].rstrip()
            rest = (body[self._sent:-1] if body.endswith("}") else body[self._sent:]).rstrip()
            if rest:
                events.append(self._args_rest(call, rest))
            self.calls.append(call)
            return events
        try:
            obj = json.loads(block)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj):
            return [("content", OPEN + block + CLOSE)]
        args = obj["arguments"]
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = _Call(len(self.calls), new_call_id(), obj["name"], text)
        self.calls.append(call)
        return [("call", {"index": call.index, "id": call.id, "name": call.name,
                          "arguments": text})]

    @staticmethod
    def _args_rest(call: _Call, rest: str) -> tuple[str, Any]:
        call.arguments += rest
        return ("call", {"index": call.index, "arguments": rest})

    def finish(self) -> list[tuple[str, Any]]:
        """The answer ended: text held back is content; an unclosed block too (cut short)."""
        events: list[tuple[str, Any]] = []
        if self._block is not None:
            if self._call is not None:      # cut short mid-arguments: keep what was streamed
                rest = (self._block + self._buf)[self._args_at + self._sent:]
                if rest:
                    events.append(self._args_rest(self._call, rest))
                self.calls.append(self._call)
            else:
                events.append(("content", OPEN + self._block + self._buf))
        elif self._buf:
            events.append(("content", self._buf))
        self._buf, self._block, self._call = "", None, None
        return events


def collect(text: str) -> tuple[str, list[dict]]:
    """The whole answer: (content, OpenAI tool_calls)."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in parser.calls]
    return content, calls


def delta_json(d: dict) -> dict:
    """A streamed tool-call delta in OpenAI's shape."""
    out: dict = {"index": d["index"]}
    if "id" in d:
        out["id"], out["type"] = d["id"], "function"
        out["function"] = {"name": d["name"], "arguments": d["arguments"]}
    else:
        out["function"] = {"arguments": d["arguments"]}
    return out


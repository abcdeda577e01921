"""Parse what Command-R writes after a tool_use or rag prompt.

Tool use: the model answers `Action: ```json [{"tool_name": ..., "parameters": {...}}, ...] ``` `.
Grounded generation (rag): the model answers
    Relevant Documents: 0,1
    Cited Documents: 0
    Answer: ...                       (citation_mode "accurate" only)
    Grounded answer: The <co: 0>emperor penguin</co: 0> is the tallest.

Model output is not trusted to be well formed: the parsers never raise. On malformed output they return an empty
result that keeps the raw text and says in `error` what was wrong, so the server can fall back to plain text.
"""

import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    name: str
    parameters: dict


@dataclass
class ToolCalls:
    calls: list[ToolCall]
    raw: str
    error: str | None = None  # why `raw` could not be parsed; None when it was


@dataclass(frozen=True)
class Citation:
    start: int  # offsets of the cited span in GroundedAnswer.text
    end: int
    text: str
    document_ids: tuple[int, ...]


@dataclass
class GroundedAnswer:
    text: str  # the grounded answer without citation markup
    citations: list[Citation]
    raw: str
    relevant_documents: list[int] = field(default_factory=list)
    cited_documents: list[int] = field(default_factory=list)
    error: str | None = None  # why `raw` could not be parsed; None when it was


class _Malformed(Exception):
    pass


def parse_tool_calls(text: str) -> ToolCalls:
    """Parse `Action: ```json [...] ``` ` into tool calls."""
    try:
        return ToolCalls(calls=_tool_calls(text), raw=text)
    except _Malformed as err:
        return ToolCalls(calls=[], raw=text, error=str(err))


def _tool_calls(text: str) -> list[ToolCall]:
    action = text.find("Action:")
    if action < 0:
        raise _Malformed("no 'Action:' in the output")
    body = text[action + len("Action:") :].lstrip()
    # The list is normally fenced as ```json ... ```; the closing fence may be missing when generation stopped early.
    if body.startswith("```"):
        body = body[3:]
        if body.startswith("json"):
            body = body[4:]
        body = body.lstrip()
    try:
        actions, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as err:
        raise _Malformed(f"the action list is not valid JSON: {err}") from None
    if not isinstance(actions, list):
        raise _Malformed(f"the actions must be a JSON list, got {type(actions).__name__}")
    calls = []
    for i, action_item in enumerate(actions):
        if not isinstance(action_item, dict):
            raise _Malformed(f"action {i} is not a JSON object")
        name = action_item.get("tool_name")
        if not isinstance(name, str) or not name:
            raise _Malformed(f"action {i} has no tool_name string")
        # The prompt asks for `{}` when a tool takes no parameters; a missing key means the same.
        parameters = action_item.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _Malformed(f"action {i} ({name}) parameters must be a JSON object")
        calls.append(ToolCall(name=name, parameters=parameters))
    return calls


_GROUNDED = "Grounded answer:"
# A citation tag: `<co: 0,2>` opens a span cited from documents 0 and 2, `</co: 0,2>` closes it.
_TAG = re.compile(r"<(/?)co:([^>]*)>")
_DOCUMENT_LIST = re.compile(r"^(Relevant|Cited) Documents:(.*)$", re.MULTILINE)


def parse_grounded_answer(text: str) -> GroundedAnswer:
    """Parse a rag answer into plain text, citation spans and the documents the model listed."""
    try:
        return _grounded_answer(text)
    except _Malformed as err:
        return GroundedAnswer(text="", citations=[], raw=text, error=str(err))


def _grounded_answer(text: str) -> GroundedAnswer:
    start = text.find(_GROUNDED)
    if start < 0:
        raise _Malformed(f"no '{_GROUNDED}' in the output")
    listed = {"Relevant": [], "Cited": []}
    for match in _DOCUMENT_LIST.finditer(text[:start]):
        listed[match.group(1)] = _document_list(match.group(2), f"{match.group(1)} Documents")

    answer = text[start + len(_GROUNDED) :].strip()
    plain: list[str] = []
    length = 0  # len("".join(plain))
    citations = []
    open_tag = None  # (ids, start offset in the plain text) of the span being read
    position = 0
    for tag in _TAG.finditer(answer):
        piece = answer[position : tag.start()]
        plain.append(piece)
        length += len(piece)
        position = tag.end()
        closing = tag.group(1) == "/"
        ids = _document_ids(tag.group(2), tag.group(0))
        if not closing:
            if open_tag is not None:
                raise _Malformed(f"citation {tag.group(0)} opens inside another citation")
            open_tag = (ids, length)
            continue
        if open_tag is None:
            raise _Malformed(f"citation {tag.group(0)} closes a span that was never opened")
        if ids != open_tag[0]:
            raise _Malformed(f"citation {tag.group(0)} closes a span opened for documents {list(open_tag[0])}")
        # Citations don't nest, so the text since the opening tag is exactly `piece`.
        citations.append(Citation(start=open_tag[1], end=length, text=piece, document_ids=ids))
        open_tag = None
    if open_tag is not None:
        raise _Malformed(f"the citation of documents {list(open_tag[0])} is never closed")
    plain.append(answer[position:])
    return GroundedAnswer(
        text="".join(plain),
        citations=citations,
        raw=text,
        relevant_documents=listed["Relevant"],
        cited_documents=listed["Cited"],
    )


def _document_ids(text: str, tag: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise _Malformed(f"citation {tag} must name document numbers, like <co: 0,2>")
    return tuple(int(part) for part in parts)


def _document_list(text: str, what: str) -> list[int]:
    text = text.strip()
    if text == "None":
        return []
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise _Malformed(f"'{what}:' must list document numbers or None, got {text!r}")
    return [int(part) for part in parts]

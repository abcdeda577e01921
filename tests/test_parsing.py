"""Parsing Command-R tool calls and grounded (cited) answers; malformed output never raises."""

import re

import pytest

from serve.parsing import Citation, ToolCall, parse_grounded_answer, parse_tool_calls

TOOL_OUTPUT = """Action: ```json
[
    {
        "tool_name": "internet_search",
        "parameters": {
            "query": "biggest penguin in the world"
        }
    },
    {
        "tool_name": "directly_answer",
        "parameters": {}
    }
]
```"""


def test_tool_calls():
    result = parse_tool_calls(TOOL_OUTPUT)
    assert result.error is None
    assert result.calls == [
        ToolCall("internet_search", {"query": "biggest penguin in the world"}),
        ToolCall("directly_answer", {}),
    ]
    assert result.raw == TOOL_OUTPUT


@pytest.mark.parametrize(
    "text, calls",
    [
        # As the tool_use template renders past calls: text first, "]```" closing.
        ('Let me look.\nAction:\n```json\n[\n    {\n        "tool_name": "f",\n'
         '        "parameters": {"x": [1, 2]}\n    }\n]```\n',
         [ToolCall("f", {"x": [1, 2]})]),
        # No fence at all, non-ASCII parameters, parameters omitted.
        ('Action: [{"tool_name": "검색", "parameters": {"q": "東京 😀"}}, {"tool_name": "g"}]',
         [ToolCall("검색", {"q": "東京 😀"}), ToolCall("g", {})]),
        # Generation stopped before the closing fence.
        ('Action: ```json\n[{"tool_name": "f", "parameters": {}}]', [ToolCall("f", {})]),
        ("Action: ```json\n[]\n```", []),
    ],
)
def test_tool_call_variants(text, calls):
    result = parse_tool_calls(text)
    assert result.error is None
    assert result.calls == calls


@pytest.mark.parametrize(
    "text, error",
    [
        ("The biggest penguin is the emperor penguin.", "no 'Action:'"),
        ('Action: ```json\n[{"tool_name": "f", "parameters": {"q": "unterminated', "not valid JSON"),
        ('Action: ```json\n{"tool_name": "f", "parameters": {}}\n```', "must be a JSON list"),
        ('Action: ```json\n["f"]\n```', "action 0 is not a JSON object"),
        ('Action: ```json\n[{"parameters": {}}]\n```', "action 0 has no tool_name"),
        ('Action: ```json\n[{"tool_name": "f", "parameters": {}}, {"tool_name": "g", "parameters": "q=1"}]\n```',
         r"action 1 \(g\) parameters"),
        ("", "no 'Action:'"),
    ],
)
def test_malformed_tool_calls(text, error):
    result = parse_tool_calls(text)
    assert result.calls == []
    assert result.raw == text
    assert re.search(error, result.error)


ACCURATE = """Relevant Documents: 0,1,2
Cited Documents: 0,2
Answer: The emperor penguin is the tallest penguin, and it lives in Antarctica.
Grounded answer: The <co: 0>emperor penguin</co: 0> is the tallest penguin, and it lives in \
<co: 0,2>Antarctica</co: 0,2>."""


def test_grounded_answer():
    result = parse_grounded_answer(ACCURATE)
    assert result.error is None
    assert result.text == "The emperor penguin is the tallest penguin, and it lives in Antarctica."
    assert result.citations == [Citation(4, 19, "emperor penguin", (0,)), Citation(60, 70, "Antarctica", (0, 2))]
    for citation in result.citations:
        assert result.text[citation.start : citation.end] == citation.text
    assert result.relevant_documents == [0, 1, 2]
    assert result.cited_documents == [0, 2]
    assert result.raw == ACCURATE


def test_grounded_answer_fast_mode_and_non_ascii():
    text = ("Relevant Documents: None\nCited Documents: None\n"
            "Grounded answer: <co: 1>황제펭귄</co: 1>은 <co: 1, 3>남극 🐧</co: 1,3>에 산다.")
    result = parse_grounded_answer(text)
    assert result.error is None
    assert result.text == "황제펭귄은 남극 🐧에 산다."
    assert [(c.text, c.document_ids) for c in result.citations] == [("황제펭귄", (1,)), ("남극 🐧", (1, 3))]
    for citation in result.citations:
        assert result.text[citation.start : citation.end] == citation.text
    assert result.relevant_documents == [] and result.cited_documents == []


def test_grounded_answer_without_citations():
    result = parse_grounded_answer("Grounded answer: I could not find that in the documents.")
    assert result.error is None
    assert result.text == "I could not find that in the documents."
    assert result.citations == []


@pytest.mark.parametrize(
    "text, error",
    [
        ("Answer: no grounded part", "no 'Grounded answer:'"),
        ("Grounded answer: <co: 0>never closed", "never closed"),
        ("Grounded answer: closed </co: 0> first", "never opened"),
        ("Grounded answer: <co: 0>a <co: 1>b</co: 1></co: 0>", "opens inside another citation"),
        ("Grounded answer: <co: 0>a</co: 1>", "closes a span opened for documents [0]"),
        ("Grounded answer: <co: doc>a</co: doc>", "must name document numbers"),
        ("Relevant Documents: zero\nGrounded answer: x", "'Relevant Documents:' must list document numbers"),
        ("", "no 'Grounded answer:'"),
    ],
)
def test_malformed_grounded_answer(text, error):
    result = parse_grounded_answer(text)
    assert result.text == "" and result.citations == []
    assert result.raw == text
    assert error in result.error

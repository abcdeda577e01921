"""serve.chat renders Cohere chat templates exactly like transformers' apply_chat_template, text and token ids."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from serve.chat import ChatTemplateError, ChatTemplates

from tests.conftest import REPO, SHARED

TINY = REPO / "reference" / "tiny"


def _shared_templates() -> Path:
    # The real checkpoints' templates: read-only fixtures beside the repository (X/<repo> and X/shared).
    return SHARED / "fixtures" / "cohere" / "templates"


def _tiny_config() -> dict:
    return json.loads((TINY / "tokenizer_config.json").read_text(encoding="utf-8"))


# --- inputs -------------------------------------------------------------------------------------------------------

COHERE_TOOLS = [
    {
        "name": "internet_search",
        "description": "Returns a list of relevant document snippets for a textual query retrieved from the internet",
        "parameter_definitions": {
            "query": {"description": "Query to search the internet with", "type": "str", "required": True},
            "max_results": {"description": "How many results to return", "type": "int", "required": False},
        },
    },
    {
        "name": "directly_answer",
        "description": "Calls a standard (un-augmented) AI chatbot to generate a response given the conversation history",
        "parameter_definitions": {},
    },
]

JSON_SCHEMA_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich or 서울"},
                    "days": {"type": "integer", "description": "Forecast days"},
                    "units": {"type": ["string", "integer"], "description": "a unit name or code"},
                    "hours": {"type": "array", "items": {"type": "number"}, "description": "Hours of the day"},
                    "extra": {"type": "object", "additionalProperties": {"type": "boolean"}, "description": "Flags"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "now",
            "description": "The current time",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    },
]

DOCUMENTS = [
    {"title": "Tall penguins", "text": "Emperor penguins are the tallest.", "url": "https://example.com/tall"},
    {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica.", "year": 2021},
    {"title": "펭귄 🐧", "snippet": "황제펭귄은 남극에 산다. ペンギンは飛べません。"},
]

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in the user's language."}
MULTI_TURN = [
    {"role": "user", "content": "  Hello, how are you?  "},
    {"role": "assistant", "content": "I'm fine, thanks. How can I help?"},
    {"role": "user", "content": "What's the biggest penguin in the world?"},
]
NON_ASCII = [{"role": "user", "content": "안녕하세요! こんにちは 😀 — Ça va? Straße, naïve e\u0301"}]

TOOL_ROUND = [
    {"role": "user", "content": "What's the weather in Zürich and what time is it?"},
    {
        "role": "assistant",
        "content": None,
        "tool_plan": "I will look up the weather and the time.",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
            {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "Document: 0\nforecast: sunny, 21°C"},
    {"role": "tool", "tool_call_id": "call_1", "content": "10:30"},
]
ASSISTANT_TEXT_AND_CALL = [
    {"role": "user", "content": "Search for penguins"},
    {
        "role": "assistant",
        "content": "Let me search.",
        "tool_calls": [{"name": "internet_search", "arguments": {"query": "penguins \"emperor\""}}],
    },
    {"role": "tool", "content": "Emperor penguins are the tallest."},
]

# (case id, template name, messages, tools, documents, extra kwargs)
CASES = [
    ("default/user", "default", [MULTI_TURN[0]], None, None, {}),
    ("default/system+multi-turn", "default", [SYSTEM, *MULTI_TURN], None, None, {}),
    ("default/non-ascii", "default", NON_ASCII, None, None, {}),
    ("default/no-generation-prompt", "default", MULTI_TURN[:2], None, None, {"add_generation_prompt": False}),
    ("tool_use/cohere-tools", "tool_use", MULTI_TURN, COHERE_TOOLS, None, {}),
    ("tool_use/cohere-tools+system", "tool_use", [SYSTEM, *NON_ASCII], COHERE_TOOLS, None, {}),
    ("tool_use/json-schema-tools", "tool_use", NON_ASCII, JSON_SCHEMA_TOOLS, None, {}),
    ("tool_use/tool-calls+results", "tool_use", TOOL_ROUND, JSON_SCHEMA_TOOLS, None, {}),
    ("tool_use/text+call+result", "tool_use", ASSISTANT_TEXT_AND_CALL, COHERE_TOOLS, None, {}),
    ("r7b/plain", "r7b", [SYSTEM, *MULTI_TURN], None, None, {}),
    ("r7b/tools+calls+results", "r7b", TOOL_ROUND, JSON_SCHEMA_TOOLS, None, {}),
    # R7B's template loops over `tools` unguarded once documents are given, so documents need tools (here and in
    # transformers alike).
    ("r7b/documents+tools", "r7b", NON_ASCII, JSON_SCHEMA_TOOLS, DOCUMENTS, {}),
    ("rag/accurate", "rag", MULTI_TURN, None, DOCUMENTS, {}),
    ("rag/fast", "rag", MULTI_TURN, None, DOCUMENTS, {"citation_mode": "fast"}),
    ("rag/system+non-ascii", "rag", [SYSTEM, *NON_ASCII], None, DOCUMENTS[2:], {}),
    ("rag/no-documents", "rag", MULTI_TURN, None, [], {}),
]


@pytest.fixture(scope="module")
def templates() -> ChatTemplates:
    config = _tiny_config()
    chat = ChatTemplates.from_tokenizer_config(config)
    # The R7B template is not part of the tiny model: render it under its own name with the same special tokens.
    r7b = (_shared_templates() / "command-r7b-12-2024.tool_use.jinja").read_text(encoding="utf-8")
    return ChatTemplates({**chat.templates, "r7b": r7b}, chat.special_tokens)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY / "tokenizer.json"))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_matches_transformers(case, templates, hf_tokenizer, tokenizer):
    _, name, messages, tools, documents, extra = case
    add_generation_prompt = extra.get("add_generation_prompt", True)
    citation_mode = extra.get("citation_mode", "accurate")
    ours = templates.render(
        messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        citation_mode=citation_mode,
        template=name,
    )
    hf_kwargs = dict(
        chat_template=templates.templates[name],
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        citation_mode=citation_mode,
    )
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, **hf_kwargs)
    assert ours == expected
    expected_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **hf_kwargs)
    assert tokenizer.encode(ours, add_special_tokens=False).ids == expected_ids
    # The template writes BOS itself, once.
    assert expected_ids[0] == tokenizer.token_to_id("<BOS_TOKEN>") != expected_ids[1]


def test_default_golden():
    # COHERE.md 4.4: the expected output of the Command-R default template.
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    assert chat.render([{"role": "user", "content": "Hello, how are you?"}]) == (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )


def test_rag_format():
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    docs = [{"title": "A", "text": "one"}, {"title": "B", "text": "two", "url": "u"}]
    accurate = chat.render([{"role": "user", "content": "q"}], documents=docs)
    assert "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Safety Preamble\n" in accurate
    assert "\n\n# User Preamble\n## Task and Context\nYou help people answer their questions" in accurate
    assert (
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>q<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\nDocument: 0\ntitle: A\ntext: one\n\n"
        "Document: 1\ntitle: B\ntext: two\nurl: u\n</results><|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Carefully perform the following instructions, in order, "
        "starting each with a new line.\n"
    ) in accurate
    assert "'Relevant Documents:'" in accurate and "'Cited Documents:'" in accurate
    assert "Thirdly, Write 'Answer:'" in accurate
    assert accurate.endswith(
        "e.g <co: 0>my fact</co: 0> for a fact from document 0.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )
    fast = chat.render([{"role": "user", "content": "q"}], documents=docs, citation_mode="fast")
    assert "'Answer:'" not in fast and "Finally, Write 'Grounded answer:'" in fast
    # A system message replaces the default task-and-context preamble.
    custom = chat.render([{"role": "system", "content": "## Task\nBe brief."}, {"role": "user", "content": "q"}], documents=docs)
    assert "# User Preamble\n## Task\nBe brief.<|END_OF_TURN_TOKEN|>" in custom


def test_selects_template_by_tools_and_documents():
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    assert chat.select() == "default"
    assert chat.select(tools=COHERE_TOOLS) == "tool_use"
    assert chat.select(documents=DOCUMENTS) == "rag"
    assert "## Available Tools" in chat.render(MULTI_TURN, tools=COHERE_TOOLS)
    assert "<results>" in chat.render(MULTI_TURN, documents=DOCUMENTS)


def test_string_template_renders_everything():
    # A checkpoint with one string template uses it for tools and documents too, as transformers does.
    chat = ChatTemplates.from_tokenizer_config(
        {"chat_template": "{{ bos_token }}{{ (tools or [])|length }} {{ (documents or [])|length }}", "bos_token": {"content": "<s>"}}
    )
    assert chat.render(MULTI_TURN, tools=COHERE_TOOLS) == "<s>2 0"
    assert chat.render(MULTI_TURN, documents=DOCUMENTS) == "<s>0 3"


def test_tojson_and_globals_follow_transformers():
    chat = ChatTemplates(
        {"default": "{{ messages[0].content|tojson }}|{{ {'a': '<ü>'}|tojson(indent=1) }}|{{ strftime_now('%Y')|length }}"
                    "|{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}|{{ dict(x=1) }}"
                    "|{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
                    "|{% generation %}kept{% endgeneration %}"},
        {},
    )
    out = chat.render([{"role": "user", "content": "<b>naïve</b> & 'x'"}])
    assert out == '"<b>naïve</b> & \'x\'"|{\n "a": "<ü>"\n}|4|2|{\'x\': 1}|1|kept'


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list of dicts"),
        ([], "messages is empty"),
        (["hello"], "message 0 must be a dict"),
        ([{"role": "robot", "content": "hi"}], "message 0 has role 'robot'"),
        ([{"content": "hi"}], "message 0 has role None"),
        ([{"role": "user"}], r"message 0 \(user\) content is missing"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"message 0 \(user\) content is a list"),
        ([{"role": "user", "content": "hi", "tool_calls": [{"name": "x"}]}], "only assistant messages"),
        ([{"role": "assistant", "tool_calls": "x"}], "tool_calls must be a list of dicts"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "Conversation roles must alternate"),
        ([{"role": "assistant", "content": "I start"}], "Conversation roles must alternate"),
    ],
)
def test_message_errors(messages, match):
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    with pytest.raises(ChatTemplateError, match=match):
        chat.render(messages)


def test_assistant_tool_calls_need_no_content():
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    prompt = chat.render(TOOL_ROUND, tools=JSON_SCHEMA_TOOLS)
    # The None content is dropped before rendering, so the template's `content is defined` test skips it.
    assert '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>\nAction:\n```json\n[\n    {\n        "tool_name": "get_weather",' in prompt


def test_request_errors():
    chat = ChatTemplates.from_tokenizer_config(_tiny_config())
    with pytest.raises(ChatTemplateError, match="not both"):
        chat.render(MULTI_TURN, tools=COHERE_TOOLS, documents=DOCUMENTS)
    with pytest.raises(ChatTemplateError, match="citation_mode"):
        chat.render(MULTI_TURN, documents=DOCUMENTS, citation_mode="slow")
    with pytest.raises(ChatTemplateError, match="documents must be a list of dicts"):
        chat.render(MULTI_TURN, documents=["text"])
    with pytest.raises(ChatTemplateError, match="tools must be a list of dicts"):
        chat.render(MULTI_TURN, tools="search")
    with pytest.raises(ChatTemplateError, match="only JSON types"):
        chat.render([{"role": "user", "content": "hi", "extra": object()}])
    with pytest.raises(ChatTemplateError, match="no 'nope' chat template"):
        chat.render(MULTI_TURN, template="nope")

    default_only = ChatTemplates.from_tokenizer_config(
        {"chat_template": [{"name": "default", "template": "{{ bos_token }}"}], "bos_token": "<BOS_TOKEN>"}
    )
    with pytest.raises(ChatTemplateError, match="no 'rag' chat template, needed for documents"):
        default_only.render(MULTI_TURN, documents=DOCUMENTS)
    with pytest.raises(ChatTemplateError, match="no 'tool_use' chat template, needed for tools"):
        default_only.render(MULTI_TURN, tools=COHERE_TOOLS)


def test_template_failures_become_chat_template_errors(templates):
    # command-r-plus's json_to_python_type recurses forever on a JSON-schema type it doesn't map, like "null".
    nullable = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": ["string", "null"], "description": "x"}}, "required": []}}}]
    with pytest.raises(ChatTemplateError, match="recursed without end"):
        templates.render(MULTI_TURN, tools=nullable)
    with pytest.raises(ChatTemplateError, match="'r7b' failed on these messages: TypeError"):
        templates.render(MULTI_TURN, documents=DOCUMENTS, template="r7b")


def test_config_errors():
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplates.from_tokenizer_config({})
    with pytest.raises(ChatTemplateError, match=r"chat_template\[0\] must be"):
        ChatTemplates.from_tokenizer_config({"chat_template": [{"name": "default"}]})
    broken = ChatTemplates.from_tokenizer_config({"chat_template": "{% if %}"})
    with pytest.raises(ChatTemplateError, match="not valid jinja"):
        broken.render(MULTI_TURN)
    failing = ChatTemplates.from_tokenizer_config({"chat_template": "{{ messages[0].content.nope() }}"})
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        failing.render(MULTI_TURN)


def test_tiny_tokenizer_layout(tokenizer):
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 1024
    expected = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>",
                "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]
    assert [tokenizer.token_to_id(token) for token in expected] == list(range(13))
    assert tokenizer.encode("Hello").ids[0] == 5  # the post-processor prepends BOS


def test_tiny_tokenizer_is_reproducible(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_tokenizer.py"), "--out", str(tmp_path), "--templates", str(_shared_templates())],
        check=True,
        capture_output=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name

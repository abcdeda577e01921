"""serve.chat renders chat templates exactly like transformers' apply_chat_template, text and token ids: the tiny
model's own templates (docs/chat-templates.md) always, Cohere's published ones when ../shared holds them."""

import json
import re
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from serve.chat import ChatTemplateError, ChatTemplates
from serve.parsing import ToolCall, parse_tool_calls

from tests.conftest import REPO, SHARED, needs_shared

TINY = REPO / "reference" / "tiny"
# Cohere's published templates (read only by the @needs_shared tests), under the names the cases use.
COHERE_TEMPLATES = SHARED / "fixtures" / "cohere" / "templates"
COHERE_FILES = {
    "command-r": "command-r.default.jinja",
    "command-r-plus": "command-r-plus.tool_use.jinja",
    "r7b": "command-r7b-12-2024.tool_use.jinja",
}


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
        "description": "Calls a standard (un-augmented) AI chatbot to generate a response given the conversation "
                       "history",
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
            {"id": "call_0", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
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

STRING_ARGUMENTS = [
    {"role": "user", "content": "Weather in Paris?"},
    # OpenAI clients send arguments as a JSON string; the template writes it as it is.
    {"role": "assistant",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny in Paris."},
    {"role": "user", "content": "And tomorrow?"},
]
BARE_TOOL = [{"type": "function", "function": {"name": "now"}}]  # OpenAI lets description and parameters out
LATE_SYSTEM = [*MULTI_TURN[:2], {"role": "system", "content": " Be brief. "}, MULTI_TURN[2]]

# (case id, template name, messages, tools, documents, extra kwargs)
TINY_CASES = [
    ("default/user", "default", [MULTI_TURN[0]], None, None, {}),
    ("default/system+multi-turn", "default", [SYSTEM, *MULTI_TURN], None, None, {}),
    ("default/late-system", "default", LATE_SYSTEM, None, None, {}),
    ("default/non-ascii", "default", NON_ASCII, None, None, {}),
    ("default/no-generation-prompt", "default", MULTI_TURN[:2], None, None, {"add_generation_prompt": False}),
    ("tool_use/cohere-tools", "tool_use", MULTI_TURN, COHERE_TOOLS, None, {}),
    ("tool_use/cohere-tools+system", "tool_use", [SYSTEM, *NON_ASCII], COHERE_TOOLS, None, {}),
    ("tool_use/json-schema-tools", "tool_use", NON_ASCII, JSON_SCHEMA_TOOLS, None, {}),
    ("tool_use/bare-tool+late-system", "tool_use", LATE_SYSTEM, BARE_TOOL, None, {}),
    ("tool_use/tool-calls+results", "tool_use", TOOL_ROUND, JSON_SCHEMA_TOOLS, None, {}),
    ("tool_use/text+call+result", "tool_use", ASSISTANT_TEXT_AND_CALL, COHERE_TOOLS, None, {}),
    ("tool_use/string-arguments", "tool_use", STRING_ARGUMENTS, JSON_SCHEMA_TOOLS, None, {}),
    ("rag/accurate", "rag", MULTI_TURN, None, DOCUMENTS, {}),
    ("rag/fast", "rag", MULTI_TURN, None, DOCUMENTS, {"citation_mode": "fast"}),
    ("rag/system+non-ascii", "rag", [SYSTEM, *NON_ASCII], None, DOCUMENTS[2:], {}),
    ("rag/late-system", "rag", LATE_SYSTEM, None, DOCUMENTS[:1], {}),
    ("rag/no-documents", "rag", MULTI_TURN, None, [], {}),
]

COHERE_CASES = [
    ("command-r/user", "command-r", [MULTI_TURN[0]], None, None, {}),
    ("command-r/system+multi-turn", "command-r", [SYSTEM, *MULTI_TURN], None, None, {}),
    ("command-r/non-ascii", "command-r", NON_ASCII, None, None, {}),
    ("command-r/no-generation-prompt", "command-r", MULTI_TURN[:2], None, None, {"add_generation_prompt": False}),
    ("command-r-plus/cohere-tools", "command-r-plus", MULTI_TURN, COHERE_TOOLS, None, {}),
    ("command-r-plus/cohere-tools+system", "command-r-plus", [SYSTEM, *NON_ASCII], COHERE_TOOLS, None, {}),
    ("command-r-plus/json-schema-tools", "command-r-plus", NON_ASCII, JSON_SCHEMA_TOOLS, None, {}),
    ("command-r-plus/tool-calls+results", "command-r-plus", TOOL_ROUND, JSON_SCHEMA_TOOLS, None, {}),
    ("command-r-plus/text+call+result", "command-r-plus", ASSISTANT_TEXT_AND_CALL, COHERE_TOOLS, None, {}),
    ("r7b/plain", "r7b", [SYSTEM, *MULTI_TURN], None, None, {}),
    ("r7b/tools+calls+results", "r7b", TOOL_ROUND, JSON_SCHEMA_TOOLS, None, {}),
    # R7B's template loops over `tools` unguarded once documents are given, so documents need tools (here and in
    # transformers alike).
    ("r7b/documents+tools", "r7b", NON_ASCII, JSON_SCHEMA_TOOLS, DOCUMENTS, {}),
]


@pytest.fixture(scope="module")
def tiny_templates() -> ChatTemplates:
    return ChatTemplates.from_tokenizer_config(_tiny_config())


@pytest.fixture(scope="module")
def cohere_templates(tiny_templates) -> ChatTemplates:
    # Cohere's templates, rendered with the tiny model's special tokens (the same tokens, by name and protocol).
    templates = {name: (COHERE_TEMPLATES / file).read_text(encoding="utf-8") for name, file in COHERE_FILES.items()}
    return ChatTemplates(templates, tiny_templates.special_tokens)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY / "tokenizer.json"))


def _check_against_transformers(templates, case, hf_tokenizer, tokenizer):
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


@pytest.mark.parametrize("case", TINY_CASES, ids=[case[0] for case in TINY_CASES])
def test_tiny_templates_match_transformers(case, tiny_templates, hf_tokenizer, tokenizer):
    _check_against_transformers(tiny_templates, case, hf_tokenizer, tokenizer)


@needs_shared
@pytest.mark.parametrize("case", COHERE_CASES, ids=[case[0] for case in COHERE_CASES])
def test_cohere_templates_match_transformers(case, cohere_templates, hf_tokenizer, tokenizer):
    _check_against_transformers(cohere_templates, case, hf_tokenizer, tokenizer)


# One user turn as Command-R's default template renders it (the example in Cohere's published template notes).
DEFAULT_GOLDEN = (
    "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|>"
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
)


def test_default_golden(tiny_templates):
    assert tiny_templates.render([{"role": "user", "content": " Hello, how are you? "}]) == DEFAULT_GOLDEN


@needs_shared
def test_cohere_default_golden(cohere_templates):
    # The tiny model's default template speaks the protocol of Command-R's own.
    prompt = cohere_templates.render([{"role": "user", "content": "Hello, how are you?"}], template="command-r")
    assert prompt == DEFAULT_GOLDEN


def test_tool_use_format(tiny_templates):
    nullable = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": ["string", "null"]}, "y": {"description": "any y"}}}}}]
    tools = COHERE_TOOLS + JSON_SCHEMA_TOOLS + nullable
    prompt = tiny_templates.render([{"role": "user", "content": "q"}], tools=tools)
    system, user, instruction, generation = prompt.split("<|END_OF_TURN_TOKEN|>")
    assert system == (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant with tools.\n\n## Tools\n\n"
        f"### internet_search\n{COHERE_TOOLS[0]['description']}\n"
        "- query (str, required): Query to search the internet with\n"
        "- max_results (int, optional): How many results to return\n\n"
        f"### directly_answer\n{COHERE_TOOLS[1]['description']}\n\n"
        "### get_weather\nGet the current weather in a city\n"
        "- city (string, required): City name, e.g. Zürich or 서울\n"
        "- days (integer, optional): Forecast days\n"
        "- units (string or integer, optional): a unit name or code\n"
        "- hours (array of number, optional): Hours of the day\n"
        "- extra (object, optional): Flags\n\n"
        "### now\nThe current time\n\n"
        "### f\n- x (string or null, optional)\n- y (any, optional): any y"
    )
    assert user == "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>q"
    assert instruction.startswith("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>To call tools, reply like this")
    # The example the prompt gives is what serve.parsing reads back.
    example = parse_tool_calls(instruction)
    assert example.error is None and example.calls == [ToolCall("<name>", {"<parameter>": "<value>"})]
    assert generation == "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"


@pytest.mark.parametrize("messages", [TOOL_ROUND, ASSISTANT_TEXT_AND_CALL, STRING_ARGUMENTS],
                         ids=["openai", "flat", "string-arguments"])
def test_past_tool_calls_render_as_the_model_should_answer(tiny_templates, messages):
    prompt = tiny_templates.render(messages, tools=JSON_SCHEMA_TOOLS)
    turns = [turn for turn in prompt.split("<|END_OF_TURN_TOKEN|>")
             if turn.startswith("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>") and "Action:" in turn]
    assistant = next(m for m in messages if "tool_calls" in m)
    assert len(turns) == 1
    parsed = parse_tool_calls(turns[0])
    expected = []
    for call in assistant["tool_calls"]:
        call = call.get("function", call)
        arguments = call["arguments"]
        expected.append(ToolCall(call["name"], json.loads(arguments) if isinstance(arguments, str) else arguments))
    assert parsed.error is None and parsed.calls == expected
    # Each tool result is its own system turn inside <results>.
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert all(f"<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\n{r}\n</results>" in prompt for r in results)


def test_rag_format(tiny_templates):
    docs = [{"title": "A", "text": "one"}, {"title": "B", "text": "two", "url": "u"}]
    accurate = tiny_templates.render([{"role": "user", "content": " q "}], documents=docs)
    preamble, user, results, instruction, generation = accurate.split("<|END_OF_TURN_TOKEN|>")
    assert preamble == ("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>"
                        "You are a helpful assistant. Answer from the documents and cite them.")
    assert user == "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>q"
    assert results == (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\nDocument: 0\ntitle: A\ntext: one\n\n"
        "Document: 1\ntitle: B\ntext: two\nurl: u\n</results>"
    )
    assert generation == "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    # The lines the instruction asks for, in order, are the ones serve.parsing reads.
    labels = re.findall(r"^([A-Z][A-Za-z ]*):", instruction.split("<|SYSTEM_TOKEN|>")[1], re.MULTILINE)
    assert labels == ["Relevant Documents", "Cited Documents", "Answer", "Grounded answer"]
    assert "<co: N>fact</co: N>" in instruction
    fast = tiny_templates.render([{"role": "user", "content": "q"}], documents=docs, citation_mode="fast")
    assert fast == accurate.replace("Answer: the answer without citations\n", "")
    # A first system message replaces the default preamble.
    custom = tiny_templates.render([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "q"}],
                                   documents=docs)
    assert custom == accurate.replace(preamble, "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.")


def test_selects_template_by_tools_and_documents(tiny_templates):
    chat = tiny_templates
    assert chat.select() == "default"
    assert chat.select(tools=COHERE_TOOLS) == "tool_use"
    assert chat.select(documents=DOCUMENTS) == "rag"
    assert "## Tools" in chat.render(MULTI_TURN, tools=COHERE_TOOLS)
    assert "<results>" in chat.render(MULTI_TURN, documents=DOCUMENTS)


def test_string_template_renders_everything():
    # A checkpoint with one string template uses it for tools and documents too, as transformers does.
    chat = ChatTemplates.from_tokenizer_config(
        {"chat_template": "{{ bos_token }}{{ (tools or [])|length }} {{ (documents or [])|length }}",
         "bos_token": {"content": "<s>"}}
    )
    assert chat.render(MULTI_TURN, tools=COHERE_TOOLS) == "<s>2 0"
    assert chat.render(MULTI_TURN, documents=DOCUMENTS) == "<s>0 3"


def test_tojson_and_globals_follow_transformers():
    chat = ChatTemplates(
        {"default": "{{ messages[0].content|tojson }}|{{ {'a': '<ü>'}|tojson(indent=1) }}"
                    "|{{ strftime_now('%Y')|length }}"
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
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
         "Conversation roles must alternate"),
        ([{"role": "assistant", "content": "I start"}], "Conversation roles must alternate"),
    ],
)
def test_message_errors(messages, match, tiny_templates):
    with pytest.raises(ChatTemplateError, match=match):
        tiny_templates.render(messages)


USER, ASSISTANT = MULTI_TURN[0], MULTI_TURN[1]
CALL = TOOL_ROUND[1]
RESULT = TOOL_ROUND[2]


@pytest.mark.parametrize(
    "messages, tools, documents, match",
    [
        ([USER, RESULT], None, None, r"'default': message 1 is a tool call or tool result: pass tools"),
        ([USER, CALL], None, None, r"'default': message 1 is a tool call or tool result"),
        ([USER, USER], COHERE_TOOLS, None, r"'tool_use': message 1 \(user\) is out of order"),
        ([USER, RESULT], COHERE_TOOLS, None, r"'tool_use': message 1 \(tool\) is out of order"),
        ([USER, ASSISTANT, RESULT], COHERE_TOOLS, None, r"'tool_use': message 2 \(tool\) is out of order"),
        ([USER, CALL, USER], COHERE_TOOLS, None, r"'tool_use': message 2 \(user\) is out of order"),
        ([SYSTEM, ASSISTANT], COHERE_TOOLS, None, r"'tool_use': message 1 \(assistant\) is out of order"),
        ([USER, CALL, RESULT], None, DOCUMENTS, r"'rag': message 1 is a tool call or tool result"),
        ([SYSTEM, USER, USER], None, DOCUMENTS,
         r"'rag': Conversation roles must alternate .* message 2 is user, expected assistant"),
    ],
)
def test_role_order_errors(messages, tools, documents, match, tiny_templates):
    with pytest.raises(ChatTemplateError, match=match):
        tiny_templates.render(messages, tools=tools, documents=documents)


def test_assistant_tool_calls_need_no_content(tiny_templates):
    prompt = tiny_templates.render(TOOL_ROUND, tools=JSON_SCHEMA_TOOLS)
    # The None content is dropped before rendering, so the template's `content is defined` test skips it.
    assert '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Action: ```json\n[{"tool_name": "get_weather",' in prompt


def test_request_errors(tiny_templates):
    chat = tiny_templates
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


def test_template_failures_become_chat_template_errors():
    chat = ChatTemplates({"endless": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                          "type-error": "{{ messages|length + 'x' }}"}, {})
    with pytest.raises(ChatTemplateError, match="'endless' recursed without end"):
        chat.render(MULTI_TURN, template="endless")
    with pytest.raises(ChatTemplateError, match="'type-error' failed on these messages: TypeError"):
        chat.render(MULTI_TURN, template="type-error")


@needs_shared
def test_cohere_template_failures_become_chat_template_errors(cohere_templates):
    # command-r-plus's json_to_python_type recurses forever on a JSON-schema type it doesn't map, like "null".
    nullable = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": ["string", "null"], "description": "x"}}, "required": []}}}]
    with pytest.raises(ChatTemplateError, match="recursed without end"):
        cohere_templates.render(MULTI_TURN, tools=nullable, template="command-r-plus")
    with pytest.raises(ChatTemplateError, match="'r7b' failed on these messages: TypeError"):
        cohere_templates.render(MULTI_TURN, documents=DOCUMENTS, template="r7b")


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
                "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                "<|SYSTEM_TOKEN|>"]
    assert [tokenizer.token_to_id(token) for token in expected] == list(range(13))
    assert tokenizer.encode("Hello").ids[0] == 5  # the post-processor prepends BOS


def test_tiny_tokenizer_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name

"""Render Cohere chat templates exactly as transformers' `apply_chat_template(..., tokenize=False)` does.

transformers is a test dependency only, so this module rebuilds its jinja environment: the same sandbox and
options, the same globals and filters (`raise_exception`, `tojson`, `strftime_now`, `dict`, `namespace`, the
`{% generation %}` tag), and the same preprocessing of the inputs (drop `None`-valued message keys, alias reasoning
fields, plain-data copies). Keep it in step with transformers/utils/chat_template_utils.py.

A Command-R checkpoint stores its templates in tokenizer_config.json as a named list
(`[{"name": "default", ...}, {"name": "tool_use", ...}, {"name": "rag", ...}]`); older or other checkpoints store a
single string. `ChatTemplates.render` picks `rag` when documents are given, `tool_use` when tools are given and
`default` otherwise.
"""

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens transformers passes to every template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

ROLES = ("system", "user", "assistant", "tool")
CITATION_MODES = ("accurate", "fast")

# Names a message's reasoning is passed under; transformers copies it to the first two so templates find it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The messages, tools or documents can't be rendered with the checkpoint's chat template."""


class _GenerationTag(jinja2.ext.Extension):
    # transformers' AssistantTracker: `{% generation %}...{% endgeneration %}` marks assistant text for training
    # masks. When rendering a prompt it only outputs its body, but templates using it must still parse.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateDict:
    # transformers exposes `dict` as this object, so templates can build dicts without reaching dict's attributes.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers rejects underscore attributes on namespaces, so templates can't reach CPython internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _RaisedByTemplate(jinja2.exceptions.TemplateError):
    """What the template's own `raise_exception(...)` raises, told apart from jinja's errors."""


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of JSON types only: templates are untrusted code and must not see rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, IntEnum) can carry extra methods: strip them back to the base type, as transformers does.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key, where): _plain(item, where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    raise ChatTemplateError(f"{where} contains a {type(value).__name__}; only JSON types can be rendered")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise ChatTemplateError(f"message {i} ({role}) carries tool_calls; only assistant messages can")
            if not isinstance(tool_calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in tool_calls):
                raise ChatTemplateError(f"message {i}: tool_calls must be a list of dicts")
            # An assistant turn that only calls tools may have no text.
            if content is not None and not isinstance(content, str):
                raise ChatTemplateError(
                    f"message {i} (assistant) content must be a string or null, got {type(content).__name__}"
                )
        elif not isinstance(content, str):
            what = "is missing" if content is None else f"is a {type(content).__name__}"
            raise ChatTemplateError(f"message {i} ({role}) content {what}; it must be a string")


def _prepare_messages(messages: list) -> list[dict]:
    prepared = []
    for i, message in enumerate(messages):
        # transformers drops None-valued keys: templates test `is defined`, and would print "None" otherwise.
        message = {key: value for key, value in _plain(message, f"message {i}").items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _special_token(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class ChatTemplates:
    """The chat templates of one checkpoint, with the special tokens they are rendered with."""

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str], single: bool = False):
        if not templates:
            raise ChatTemplateError("the checkpoint has no chat template")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens)
        # A single string template is the only one there is: it also renders tools and documents, as in transformers.
        self.single = single
        self._env = _make_environment()
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_tokenizer_config(cls, config: Mapping) -> "ChatTemplates":
        """Build from a parsed tokenizer_config.json."""
        raw = config.get("chat_template")
        if raw is None:
            raise ChatTemplateError("tokenizer_config has no chat_template")
        if isinstance(raw, str):
            templates, single = {"default": raw}, True
        elif isinstance(raw, list):
            templates, single = {}, False
            for i, entry in enumerate(raw):
                if not (
                    isinstance(entry, Mapping)
                    and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)
                ):
                    raise ChatTemplateError(f"chat_template[{i}] must be {{'name': str, 'template': str}}")
                templates[entry["name"]] = entry["template"]
        else:
            raise ChatTemplateError(
                f"chat_template must be a string or a list of named templates, got {type(raw).__name__}"
            )
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _special_token(config.get(name))
            if token is not None:
                special_tokens[name] = token
        return cls(templates, special_tokens, single=single)

    def select(self, tools: list | None = None, documents: list | None = None) -> str:
        """The name of the template that renders this request."""
        if tools is not None and documents is not None:
            raise ChatTemplateError(
                "pass tools or documents, not both: Command-R renders them with different templates"
            )
        name = "rag" if documents is not None else "tool_use" if tools is not None else "default"
        if name in self.templates:
            return name
        if self.single:
            return "default"
        purpose = {"rag": "documents", "tool_use": "tools", "default": "plain chat"}[name]
        raise ChatTemplateError(
            f"the checkpoint has no {name!r} chat template, needed for {purpose}; "
            f"it has {', '.join(sorted(self.templates))}"
        )

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        citation_mode: str = "accurate",
        template: str | None = None,
    ) -> str:
        """Render a prompt. `template` names the template to use instead of choosing by tools / documents."""
        _check_messages(messages)
        if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, Mapping) for t in tools)):
            raise ChatTemplateError(
                "tools must be a list of dicts (Cohere parameter_definitions or JSON-schema functions)"
            )
        if documents is not None and not (
            isinstance(documents, (list, tuple)) and all(isinstance(d, Mapping) for d in documents)
        ):
            raise ChatTemplateError("documents must be a list of dicts, e.g. {'title': ..., 'text': ...}")
        if citation_mode not in CITATION_MODES:
            raise ChatTemplateError(f"citation_mode must be one of {', '.join(CITATION_MODES)}, got {citation_mode!r}")
        if template is None:
            name = self.select(tools, documents)
        elif template in self.templates:
            name = template
        else:
            raise ChatTemplateError(
                f"the checkpoint has no {template!r} chat template; it has {', '.join(sorted(self.templates))}"
            )

        compiled = self._compile(name)
        try:
            return compiled.render(
                messages=_prepare_messages(messages),
                tools=_plain(tools, "tools"),
                documents=_plain(documents, "documents"),
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                citation_mode=citation_mode,
            )
        except _RaisedByTemplate as err:
            # The template's own check (e.g. roles not alternating): its message is the whole story.
            raise ChatTemplateError(f"chat template {name!r}: {err.message}") from None
        except RecursionError:
            # e.g. command-r-plus's json_to_python_type macro recurses forever on a JSON-schema type like "null".
            raise ChatTemplateError(f"chat template {name!r} recursed without end on these inputs") from None
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, AttributeError, KeyError) as err:
            raise ChatTemplateError(
                f"chat template {name!r} failed on these messages: {type(err).__name__}: {err}"
            ) from err

    def _compile(self, name: str) -> jinja2.Template:
        if name not in self._compiled:
            try:
                self._compiled[name] = self._env.from_string(self.templates[name])
            except jinja2.exceptions.TemplateSyntaxError as err:
                raise ChatTemplateError(
                    f"chat template {name!r} is not valid jinja: {err.message} (line {err.lineno})"
                ) from None
        return self._compiled[name]

"""Reply shaping, in one place: what a finished generation means (tool calls, a grounded answer) and how it goes
out as OpenAI's assistant message. ``Generator.chat`` and the HTTP service both call ``parse``; the service then
builds its message with ``chat_message``.

* Tool calls become ``message.tool_calls`` (``function.arguments`` a JSON string) with ``finish_reason:
  "tool_calls"``. Output that is not a well-formed ``Action:`` list comes back raw as ``content`` with the
  generation's own finish_reason.
* With documents, ``content`` is the grounded answer without citation markup and ``citations`` lists the spans;
  malformed output comes back raw as ``content`` with ``citations: []``.
"""

from __future__ import annotations

import json
import logging
import uuid

from .batch import GenerationResult
from .parsing import parse_grounded_answer, parse_tool_calls
from .protocol import ChatMessage, CitationOut, FunctionCallOut, PromptTokensDetails, ToolCallOut, Usage

log = logging.getLogger(__name__)


def parse(result: GenerationResult, tools: bool, documents: bool) -> GenerationResult:
    """Fill ``result.tool_calls`` (a tool_use prompt) and ``result.grounded_answer`` (a rag prompt)."""
    if tools:
        result.tool_calls = parse_tool_calls(result.text)
    if documents:
        result.grounded_answer = parse_grounded_answer(result.text)
    return result


def chat_message(result: GenerationResult) -> tuple[ChatMessage, str]:
    """The assistant message and finish_reason of a result that went through ``parse``."""
    calls = result.tool_calls
    if calls is not None:
        if calls.error is None and calls.calls:
            tool_calls = [ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(
                name=call.name, arguments=json.dumps(call.parameters))) for call in calls.calls]
            return ChatMessage(content=None, tool_calls=tool_calls), "tool_calls"
        log.info("no tool calls in the reply (%s): returned as text", calls.error or "an empty action list")
    answer = result.grounded_answer
    if answer is not None:
        if answer.error is None:
            citations = [CitationOut(start=c.start, end=c.end, text=c.text, document_ids=list(c.document_ids))
                         for c in answer.citations]
            return ChatMessage(content=answer.text, citations=citations), result.finish_reason
        log.info("the grounded answer could not be parsed (%s): returned as text", answer.error)
        return ChatMessage(content=result.text, citations=[]), result.finish_reason
    return ChatMessage(content=result.text), result.finish_reason


def usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens))

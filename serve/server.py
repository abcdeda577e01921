"""An OpenAI-compatible HTTP service for one artifact (FastAPI on uvicorn), with continuous batching.

    python -m serve build/tiny-float32 --port 8000                 # binds 127.0.0.1
    COHERE_DEPLOY_API_KEY=... python -m serve build/tiny-float32 --port 8000 --host 0.0.0.0

Routes (``/v1`` routes check the API key, when one is set, as ``Authorization: Bearer KEY``):

* ``POST /v1/chat/completions``: OpenAI's chat request: ``messages``, ``tools`` (``{"type": "function",
  "function": {name, description, parameters}}``), ``tool_choice`` ("auto" or "none"), ``stream``,
  ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
  ``seed``, ``stop``, ``n`` (1 only). Extensions: ``top_k``, ``min_p``, ``repetition_penalty``; ``documents``
  (a list of ``{"title": ..., "text": ...}`` string maps) renders Command-R's grounded-generation (RAG) prompt,
  and ``citation_mode`` ("accurate" or "fast") picks its style.
* ``POST /v1/completions``: raw text continuation; ``prompt`` is a string or a list of token ids.
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served, named after the artifact folder.
* ``GET /health``: 200 while the scheduler runs, 503 otherwise. ``GET /metrics``: Prometheus text format.

Fields a request leaves out take the artifact's generation_config.json defaults (or the server's sampling flags);
``max_tokens`` defaults to that ``max_new_tokens``, clipped to the room left in the context. A request's explicit
``max_tokens`` that does not fit beside its prompt is refused.

Replies:

* Tool calls come back as OpenAI ``message.tool_calls`` (``id``, ``type: "function"``, ``function.name``,
  ``function.arguments`` as a JSON string) with ``finish_reason: "tool_calls"``. When the model's output is not a
  well-formed ``Action:`` list, the raw text comes back as ``content`` with the generation's own finish_reason.
* With ``documents``, ``message.content`` is the grounded answer without citation markup, and the extension field
  ``message.citations`` lists ``{"start", "end", "text", "document_ids"}``: ``content[start:end] == text`` is the
  span the model cited from those documents (0-based positions in ``documents``). Malformed model output comes back
  raw as ``content`` with ``citations: []``.
* Streaming (``stream: true``) sends server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
  Replies with tools or documents must be parsed whole, so their stream carries the role first and the parsed reply
  (``delta.tool_calls``, or ``delta.content`` with ``delta.citations``) in one chunk at the end.
* Errors, before a stream starts, are a 4xx/5xx with OpenAI's body ``{"error": {"message", "type", "param",
  "code"}}``; an error after a stream started (engine failure, shutdown) is one ``data: {"error": {...}}`` event.

A client that disconnects has its request cancelled: its batch row is free at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generator import GenerationResult, Generator, SamplingParams
from .parsing import parse_grounded_answer, parse_tool_calls
from .scheduler import Overloaded, Scheduler, Stopped, Ticket

log = logging.getLogger(__name__)

# A request body larger than this is refused before it is read: even a full 128k-token context is well under it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# How long SIGTERM waits for in-flight requests before uvicorn cancels them.
SHUTDOWN_GRACE_S = 30


# ------------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A refused request: rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_error(error: ValidationError) -> ApiError:
    """The first problem pydantic found, named by its field path (``messages.0.role``)."""
    first = error.errors()[0]
    # pydantic names the member of a union it tried (`stop.str`, `prompt.list[int].0`): not a field of the request.
    fields = [str(part) for part in first["loc"] if not (isinstance(part, str) and (part in ("str", "int")
                                                                                    or "[" in part))]
    param = ".".join(fields) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param=param)
    message = f"{param}: {first['msg']}" if param else first["msg"]
    given = first.get("input")
    if isinstance(given, (str, int, float, bool)) and len(repr(given)) <= 80:  # a value worth echoing
        message += f" (got {given!r})"
    return ApiError(400, message, param=param)


# ------------------------------------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    # strict: "0.5" is not a temperature and true is not a max_tokens; forbid: a misspelt or unsupported field is
    # refused by name rather than silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's format)


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict | None = None  # JSON schema of the arguments
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    documents: list[dict[str, str]] | None = None
    citation_mode: Literal["accurate", "fast"] = "accurate"


class CompletionRequest(_Sampling):
    prompt: str | list[int]


# ----------------------------------------------------------------------------------------------------- metrics


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps may share a process in tests)."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cohere_deploy_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("cohere_deploy_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=r)
        self.completion_tokens = Counter("cohere_deploy_completion_tokens",
                                         "Generated tokens (cancelled requests included)", registry=r)
        self.time_to_first_token = Histogram(
            "cohere_deploy_time_to_first_token_seconds", "From a request's arrival to its first token (finished "
            "requests)", registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        queue_depth = Gauge("cohere_deploy_queue_depth", "Requests waiting for a batch row", registry=r)
        queue_depth.set_function(lambda: scheduler.waiting)
        active = Gauge("cohere_deploy_active_requests", "Requests in a batch row", registry=r)
        active.set_function(lambda: scheduler.active)
        cancelled = Gauge("cohere_deploy_cancelled_requests", "Requests cancelled because their client went away "
                          "(since start)", registry=r)
        cancelled.set_function(lambda: scheduler.cancelled_total)

    def route(self, path: str) -> str:
        # Unknown paths share one label, so a scan of random URLs cannot grow the metric without bound.
        return path if path in self.ROUTES or path.startswith("/v1/models/") else "other"


class _CountRequests:
    """ASGI middleware counting responses by route and status (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would sit between streaming responses and their client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets when the app fails before answering

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(self.metrics.route(scope["path"]), str(status)).inc()


# --------------------------------------------------------------------------------------------------------- app


def create_app(generator: Generator, model_name: str | None = None, api_key: str | None = None,
               max_waiting: int = 256) -> FastAPI:
    """The service for one loaded generator. The scheduler thread starts and stops with the app's lifespan."""
    model_name = model_name or generator.artifact.folder.name
    scheduler = Scheduler(generator, max_waiting=max_waiting)
    metrics = Metrics(scheduler)
    created = int(time.time())
    max_context = generator.spec.max_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown has let in-flight requests finish (or cancelled them)
            scheduler.stop()

    app = FastAPI(title="cohere-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error_response(ApiError(error.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    async def read_body(request: Request, schema: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked upload has no declared length
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def sampling(body: _Sampling, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        room = max_context - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} does not fit: the prompt has {prompt_tokens} tokens and "
                                f"the model's context is {max_context} tokens, which leaves {room}",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return generator.sampling(
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, seed=body.seed, max_new_tokens=max_tokens,
                stop=[body.stop] if isinstance(body.stop, str) else body.stop)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def encode(prompt, param: str) -> list[int]:
        try:
            return generator.encode(prompt)
        except ValueError as e:  # an empty prompt, a token id outside the vocabulary, or too long for the context
            code = "context_length_exceeded" if "max_context" in str(e) else None
            raise ApiError(400, str(e), param=param, code=code) from None

    def submit(ids: list[int], params: SamplingParams, started: float) -> Ticket:
        seq = generator.new_sequence(ids, params, started)
        try:
            ticket = scheduler.submit(seq)
        except Overloaded as e:
            raise ApiError(503, str(e), type="server_error", code="server_overloaded") from None
        except Stopped as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        metrics.prompt_tokens.inc(len(ids))
        return ticket

    async def events(ticket: Ticket, request: Request) -> AsyncIterator[tuple[str, object]]:
        """The ticket's events up to its last; the request is cancelled if its client goes away first."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, scheduler, ticket))
        try:
            while True:
                kind, value = await ticket.events.get()
                yield kind, value
                if kind != "text":
                    return
        finally:  # also when the response itself is cancelled (Starlette does on disconnect) or fails to send
            watcher.cancel()
            scheduler.cancel(ticket)
            metrics.completion_tokens.inc(len(ticket.seq.token_ids))

    def finished(result: GenerationResult) -> None:
        metrics.time_to_first_token.observe(result.time_to_first_token_s)

    # --- routes

    @app.get("/health")
    async def health():
        if not scheduler.running:
            raise ApiError(503, "the scheduler is not running", type="server_error")
        return {"status": "ok", "active": scheduler.active, "waiting": scheduler.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "cohere-deploy",
                "max_context": max_context}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        authorize(request)
        body = await read_body(request, ChatCompletionRequest)
        check_model(body.model)
        tools = None if body.tool_choice == "none" or not body.tools else [_tool(t) for t in body.tools]
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
        try:  # rendering and tokenizing a long conversation is CPU work: off the event loop
            ids = await asyncio.to_thread(functools.partial(
                generator.apply_chat_template, messages, tools=tools, documents=body.documents, tokenize=True,
                citation_mode=body.citation_mode))
        except ValueError as e:  # the template's own checks (roles, tools with documents, ...)
            raise ApiError(400, str(e)) from None
        ids = encode(ids, "messages")
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        ticket = submit(ids, params, started)
        reply = _ChatReply(tools=tools is not None, documents=body.documents is not None)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name}

        if not body.stream:
            async for kind, value in events(ticket, request):
                pass  # the result holds the whole text
            result = _final(kind, value)
            finished(result)
            message, finish_reason = reply.message(result)
            return {**head, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": finish_reason}], "usage": _usage(result)}

        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in events(ticket, request):
                if kind == "text" and not reply.parsed:
                    yield chunk({"content": value})
            try:
                result = _final(kind, value)
            except ApiError as e:
                yield _sse(e.body())
                return
            finished(result)
            message, finish_reason = reply.message(result)
            if reply.parsed:
                delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                if "tool_calls" in delta:  # a streamed tool call says which call of the list it extends
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
                yield chunk(delta)
            yield chunk({}, finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"

        return _event_stream(stream())

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        authorize(request)
        body = await read_body(request, CompletionRequest)
        check_model(body.model)
        ids = await asyncio.to_thread(encode, body.prompt, "prompt")
        params = sampling(body, len(ids), body.max_tokens)
        ticket = submit(ids, params, started)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not body.stream:
            async for kind, value in events(ticket, request):
                pass  # the result holds the whole text
            result = _final(kind, value)
            finished(result)
            return {**head, "choices": [choice(result.text, result.finish_reason)], "usage": _usage(result)}

        async def stream():
            async for kind, value in events(ticket, request):
                if kind == "text":
                    yield _sse({**head, "choices": [choice(value, None)]})
            try:
                result = _final(kind, value)
            except ApiError as e:
                yield _sse(e.body())
                return
            finished(result)
            yield _sse({**head, "choices": [choice("", result.finish_reason)]})
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"

        return _event_stream(stream())

    return app


async def _cancel_on_disconnect(request: Request, scheduler: Scheduler, ticket: Ticket) -> None:
    # The body has been read, so the next message the server sends the app is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scheduler.cancel(ticket)


def _final(kind: str, value) -> GenerationResult:
    """The result of a request's last event, or the error it ended with."""
    if kind == "done":
        return value
    if kind == "cancelled":  # only after the client went away: nobody reads this
        raise ApiError(499, "the client closed the request", code="cancelled")
    if kind == "stopped":
        raise ApiError(503, value, type="server_error", code="shutting_down")
    raise ApiError(500, value, type="server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: every event should reach the client as soon as it is written.
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _tool(tool: ToolDef) -> dict:
    function = tool.function.model_dump(exclude_none=True)
    # OpenAI lets a function without arguments leave out `parameters`; Command-R's template reads its properties.
    function.setdefault("parameters", {"type": "object", "properties": {}})
    return {"type": "function", "function": function}


def _message(index: int, message: Message) -> dict:
    """An OpenAI message as the chat template wants it: text content, tool-call arguments as objects."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    out = {"role": "system" if message.role == "developer" else message.role, "content": content}
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError as e:
                arguments = e
            if not isinstance(arguments, dict):
                param = f"messages.{index}.tool_calls.{j}.function.arguments"
                raise ApiError(400, f"{param}: must be a JSON object as a string, got {call.function.arguments!r}",
                               param=param)
            calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


class _ChatReply:
    """Turns a finished generation into OpenAI's assistant message: plain text, tool calls or a grounded answer."""

    def __init__(self, tools: bool, documents: bool):
        self.tools, self.documents = tools, documents

    @property
    def parsed(self) -> bool:
        """Whether the reply must be parsed whole (and so is not streamed piece by piece)."""
        return self.tools or self.documents

    def message(self, result: GenerationResult) -> tuple[dict, str]:
        if self.tools:
            calls = parse_tool_calls(result.text)
            if calls.error is None and calls.calls:
                tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": call.name, "arguments": json.dumps(call.parameters)}}
                              for call in calls.calls]
                return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"
            log.info("no tool calls in the reply (%s): returned as text", calls.error or "an empty action list")
        if self.documents:
            answer = parse_grounded_answer(result.text)
            if answer.error is None:
                citations = [{"start": c.start, "end": c.end, "text": c.text, "document_ids": list(c.document_ids)}
                             for c in answer.citations]
                return {"role": "assistant", "content": answer.text, "citations": citations}, result.finish_reason
            log.info("the grounded answer could not be parsed (%s): returned as text", answer.error)
            return {"role": "assistant", "content": result.text, "citations": []}, result.finish_reason
        return {"role": "assistant", "content": result.text}, result.finish_reason


# ------------------------------------------------------------------------------------------------------- serve


def serve(generator: Generator, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Run the service until SIGINT / SIGTERM: uvicorn stops accepting, lets in-flight requests finish (up to
    SHUTDOWN_GRACE_S), then the scheduler stops."""
    if api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(generator, api_key=api_key)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_level="info")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

"""An OpenAI-compatible HTTP service for one artifact (FastAPI on uvicorn), with continuous batching.

    python -m serve build/tiny-float32 --port 8000                 # binds 127.0.0.1
    COHERE_DEPLOY_API_KEY=... python -m serve build/tiny-float32 --port 8000 --host 0.0.0.0

Routes (``/v1`` routes check the API key, when one is set, as ``Authorization: Bearer KEY``):

* ``POST /v1/chat/completions``: OpenAI's chat request: ``messages``, ``tools`` (``{"type": "function",
  "function": {name, description, parameters}}``), ``tool_choice`` ("auto" or "none"), ``stream``,
  ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (finite; one in
  (0, 0.01) samples as 0.01, as vLLM), ``top_p``, ``seed`` (any int64, as vLLM), ``stop`` (at most 4 strings of at
  most 256 characters, as OpenAI), ``n`` (1 only). Extensions: ``top_k``, ``min_p``, ``repetition_penalty``;
  ``documents`` (a list of ``{"title": ..., "text": ...}`` string maps) renders Command-R's grounded-generation
  (RAG) prompt, and ``citation_mode`` ("accurate" or "fast") picks its style.
* ``POST /v1/completions``: raw text continuation; ``prompt`` is a string or a list of token ids.
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served, named after the artifact folder.
* ``GET /health``: 200 while the scheduler runs, 503 otherwise. ``GET /metrics``: Prometheus text format.

Special tokens written in message content (``<|START_OF_TURN_TOKEN|>``) become control tokens, as in transformers,
vLLM and TGI; ``python -m serve --split-special-tokens`` encodes chat content as plain text instead (as OpenAI does),
the template's own markup still as control tokens (see serve/tokens.py).

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
  On SIGTERM the server stops accepting and lets requests in flight run for ``shutdown_grace_s``; streams still
  running then end with that error event (code ``shutting_down``) before uvicorn closes the connections.

A client that disconnects has its request cancelled: its batch row is free at the next engine step.

Shape (as vLLM's): serve/protocol.py holds the request and response models, serve/replies.py the reply shaping,
serve/metrics.py the metrics; ``Service`` does the work and the routes ``create_app`` declares only call it.
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

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import replies
from .batch import GenerationResult
from .generator import Generator
from .metrics import CountRequests, Metrics
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    Health,
    Message,
    ModelCard,
    ModelList,
    Reply,
    ToolDef,
    SamplingFields,
)
from .sampling import SamplingParams
from .scheduler import Overloaded, Scheduler, Stopped, Ticket

log = logging.getLogger(__name__)

# A request body larger than this is refused before it is read: even a full 128k-token context is well under it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# JSON nested deeper than this is refused: Python's parsers and the templates recurse, and no request needs more.
MAX_JSON_DEPTH = 64
# How long SIGTERM lets in-flight requests run before the streams still running get their error event.
SHUTDOWN_GRACE_S = 30
# uvicorn cancels whatever is left this long after the grace: time for those last events to go out.
SHUTDOWN_MARGIN_S = 5


# ------------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A refused request: rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).dump()


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


def check_json(data) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (a lone surrogate
    such as ``"\\ud800"``, which JSON's escapes allow but no tokenizer or UTF-8 encoder takes). Iterative: the
    depth is what is being checked."""
    todo = [(data, (), 0)]
    while todo:
        value, path, depth = todo.pop()
        param = ".".join(map(str, path)) or None
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels (at "
                                f"{'.'.join(map(str, path[:3]))}...)", param=str(path[0]), code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"{param or 'the request body'}: {value[e.start:e.end]!r} at character {e.start} "
                                    "is a lone surrogate, not valid Unicode", param=param) from None
        elif isinstance(value, dict):
            todo += [(key, path, depth + 1) for key in value]
            todo += [(item, (*path, key), depth + 1) for key, item in value.items()]
        elif isinstance(value, list):
            todo += [(item, (*path, i), depth + 1) for i, item in enumerate(value)]


# ------------------------------------------------------------------------------------------------------ service


class Service:
    """What the routes do, for one loaded generator: checks, tokenizing, scheduling, and the replies."""

    def __init__(self, generator: Generator, model_name: str | None = None, api_key: str | None = None,
                 max_waiting: int = 256, shutdown_grace_s: float = SHUTDOWN_GRACE_S):
        if api_key is not None and not api_key.strip():
            # An empty key would compare equal to an empty bearer token: refuse rather than guard nothing.
            raise ValueError("the API key is empty: give a non-empty key, or none to serve without one")
        self.generator = generator
        self.model_name = model_name or generator.artifact.folder.name
        self.api_key = api_key
        self.shutdown_grace_s = shutdown_grace_s
        self.scheduler = Scheduler(generator, max_waiting=max_waiting)
        self.metrics = Metrics(self.scheduler)
        self.created = int(time.time())
        self.max_context = generator.spec.max_context
        self._grace_timer: asyncio.TimerHandle | None = None
        self._grace_ended: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.scheduler.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown has let in-flight requests finish (or cancelled them)
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            await asyncio.to_thread(self.scheduler.stop)

    def begin_shutdown(self) -> None:
        """The server stopped accepting: requests in flight get ``shutdown_grace_s`` to finish, then the scheduler
        stops, which ends each one still running with an error event (``("stopped", ...)`` on its ticket)."""
        log.info("shutting down: in-flight requests have %.0f s to finish", self.shutdown_grace_s)
        self._grace_timer = asyncio.get_running_loop().call_later(self.shutdown_grace_s, self._end_grace)

    def _end_grace(self) -> None:
        if self.scheduler.active or self.scheduler.waiting:
            log.warning("the shutdown grace is over: ending %d running and %d waiting requests with an error",
                        self.scheduler.active, self.scheduler.waiting)
        self._grace_ended = asyncio.get_running_loop().create_task(asyncio.to_thread(self.scheduler.stop))

    # --- checks

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def read_body(self, request: Request, schema: type[BaseModel]):
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
        except RecursionError:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                           code="invalid_json") from None
        check_json(data)
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def sampling(self, body: SamplingFields, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        room = self.max_context - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} does not fit: the prompt has {prompt_tokens} tokens and "
                                f"the model's context is {self.max_context} tokens, which leaves {room}",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return self.generator.sampling(
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, seed=body.seed, max_new_tokens=max_tokens,
                stop=[body.stop] if isinstance(body.stop, str) else body.stop)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def check_sampling(self, body: SamplingFields) -> None:
        """Bad sampling parameters are refused before any tokenizing (cheap checks first)."""
        self.sampling(body, 0, None)

    async def encode(self, prompt, param: str) -> list[int]:
        try:  # in a worker thread: a long prompt's tokenizing must not stall the event loop
            return await asyncio.to_thread(self.generator.encode, prompt)
        except ValueError as e:  # empty, a token id outside the vocabulary, too long for the context, bad Unicode
            code = "context_length_exceeded" if "max_context" in str(e) else None
            raise ApiError(400, str(e), param=param, code=code) from None

    # --- scheduling

    def submit(self, ids: list[int], params: SamplingParams, started: float) -> Ticket:
        seq = self.generator.new_sequence(ids, params, started)
        try:
            ticket = self.scheduler.submit(seq)
        except Overloaded as e:
            raise ApiError(503, str(e), type="server_error", code="server_overloaded") from None
        except Stopped as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        self.metrics.prompt_tokens.inc(len(ids))
        return ticket

    async def events(self, ticket: Ticket, request: Request) -> AsyncIterator[tuple[str, object]]:
        """The ticket's events up to its last; the request is cancelled if its client goes away first."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.scheduler, ticket))
        try:
            while True:
                kind, value = await ticket.events.get()
                yield kind, value
                if kind != "text":
                    return
        finally:  # also when the response itself is cancelled (Starlette does on disconnect) or fails to send
            watcher.cancel()
            self.scheduler.cancel(ticket)
            self.metrics.completion_tokens.inc(len(ticket.seq.token_ids))

    async def result(self, ticket: Ticket, request: Request) -> GenerationResult:
        async for kind, value in self.events(ticket, request):
            pass  # the result holds the whole text
        result = _final(kind, value)
        self.metrics.time_to_first_token.observe(result.time_to_first_token_s)
        return result

    # --- routes

    def health(self) -> dict:
        if not self.scheduler.running:
            raise ApiError(503, "the scheduler is not running", type="server_error")
        return Health(active=self.scheduler.active, waiting=self.scheduler.waiting).dump()

    def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, owned_by="cohere-deploy",
                         max_context=self.max_context)

    def models(self, request: Request) -> dict:
        self.authorize(request)
        return ModelList(data=[self.model_card()]).dump()

    def model(self, name: str, request: Request) -> dict:
        self.authorize(request)
        self.check_model(name)
        return self.model_card().dump()

    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        self.authorize(request)
        body = await self.read_body(request, ChatCompletionRequest)
        self.check_model(body.model)
        self.check_sampling(body)
        tools = None if body.tool_choice == "none" or not body.tools else [_tool(t) for t in body.tools]
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
        try:  # rendering and tokenizing a long conversation is CPU work: off the event loop
            ids = await asyncio.to_thread(functools.partial(
                self.generator.apply_chat_template, messages, tools=tools, documents=body.documents, tokenize=True,
                citation_mode=body.citation_mode))
        except ValueError as e:  # the template's own checks (roles, tools with documents, ...), or too long
            code = "context_length_exceeded" if "max_context" in str(e) else None
            raise ApiError(400, str(e), param="messages" if code else None, code=code) from None
        ids = await self.encode(ids, "messages")
        params = self.sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        ticket = self.submit(ids, params, started)
        parse = functools.partial(replies.parse, tools=tools is not None, documents=body.documents is not None)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)

        if not body.stream:
            result = parse(await self.result(ticket, request))
            message, finish_reason = replies.chat_message(result)
            return ChatCompletion(**head, choices=[ChatChoice(message=message, finish_reason=finish_reason)],
                                  usage=replies.usage(result)).dump()

        whole = tools is not None or body.documents is not None  # parsed whole, so not streamed piece by piece

        def chunk(delta: ChatDelta, finish_reason: str | None = None) -> str:
            return _sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=delta,
                                                                             finish_reason=finish_reason)]))

        async def stream():
            yield chunk(ChatDelta(role="assistant", content=""))
            async for kind, value in self.events(ticket, request):
                if kind == "text" and not whole:
                    yield chunk(ChatDelta(content=value))
            try:
                result = parse(_final(kind, value))
            except ApiError as e:
                yield _sse_error(e)
                return
            self.metrics.time_to_first_token.observe(result.time_to_first_token_s)
            message, finish_reason = replies.chat_message(result)
            if whole:
                tool_calls = message.tool_calls and [call.model_copy(update={"index": i})
                                                     for i, call in enumerate(message.tool_calls)]
                yield chunk(ChatDelta(content=message.content, tool_calls=tool_calls, citations=message.citations))
            yield chunk(ChatDelta(), finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(ChatCompletionChunk(**head, choices=[], usage=replies.usage(result)))
            yield "data: [DONE]\n\n"

        return _event_stream(stream())

    async def completions(self, request: Request):
        started = time.perf_counter()
        self.authorize(request)
        body = await self.read_body(request, CompletionRequest)
        self.check_model(body.model)
        self.check_sampling(body)
        ids = await self.encode(body.prompt, "prompt")
        params = self.sampling(body, len(ids), body.max_tokens)
        ticket = self.submit(ids, params, started)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)

        if not body.stream:
            result = await self.result(ticket, request)
            return Completion(**head, choices=[CompletionChoice(text=result.text,
                                                                finish_reason=result.finish_reason)],
                              usage=replies.usage(result)).dump()

        async def stream():
            async for kind, value in self.events(ticket, request):
                if kind == "text":
                    yield _sse(Completion(**head, choices=[CompletionChoice(text=value, finish_reason=None)]))
            try:
                result = _final(kind, value)
            except ApiError as e:
                yield _sse_error(e)
                return
            self.metrics.time_to_first_token.observe(result.time_to_first_token_s)
            yield _sse(Completion(**head, choices=[CompletionChoice(text="", finish_reason=result.finish_reason)]))
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(Completion(**head, choices=[], usage=replies.usage(result)))
            yield "data: [DONE]\n\n"

        return _event_stream(stream())


# --------------------------------------------------------------------------------------------------------- app


def create_app(generator: Generator, model_name: str | None = None, api_key: str | None = None,
               max_waiting: int = 256, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> FastAPI:
    """The service for one loaded generator. The scheduler thread starts and stops with the app's lifespan; run it
    with ``GracefulServer`` so that SIGTERM's grace ends streams with an error event."""
    service = Service(generator, model_name=model_name, api_key=api_key, max_waiting=max_waiting,
                      shutdown_grace_s=shutdown_grace_s)
    app = FastAPI(title="cohere-deploy", lifespan=service.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.scheduler = service.scheduler
    app.add_middleware(CountRequests, metrics=service.metrics)

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

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def prometheus():
        return service.prometheus()

    @app.get("/v1/models")
    async def models(request: Request):
        return service.models(request)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        return service.model(name, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(request)

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


def _sse(reply: Reply) -> str:
    return f"data: {json.dumps(reply.dump(), ensure_ascii=False)}\n\n"


def _sse_error(error: ApiError) -> str:
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: every event should reach the client as soon as it is written.
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
            except (json.JSONDecodeError, RecursionError) as e:
                arguments = e
            if not isinstance(arguments, dict):
                param = f"messages.{index}.tool_calls.{j}.function.arguments"
                raise ApiError(400, f"{param}: must be a JSON object as a string, got {call.function.arguments!r}",
                               param=param)
            calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


# ------------------------------------------------------------------------------------------------------- serve


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the service when graceful shutdown begins so that streams still running when
    the grace ends get their error event (uvicorn alone would cancel them mid-stream, with no event)."""

    def __init__(self, app: FastAPI, **config):
        self.service: Service = app.state.service
        config.setdefault("timeout_graceful_shutdown", self.service.shutdown_grace_s + SHUTDOWN_MARGIN_S)
        super().__init__(uvicorn.Config(app, **config))

    async def shutdown(self, sockets=None) -> None:
        self.service.begin_shutdown()
        await super().shutdown(sockets)


def serve(generator: Generator, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Run the service until SIGINT / SIGTERM: uvicorn stops accepting, lets in-flight requests run for
    SHUTDOWN_GRACE_S, then the streams still running end with an error event and the scheduler stops."""
    if api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    GracefulServer(create_app(generator, api_key=api_key), host=host, port=port, log_level="info").run()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

"""The HTTP service on the tiny artifact: a real uvicorn server on loopback, called with the official openai client
(and httpx where the request must be malformed). Continuous batching must give every request the tokens it gets
alone; a client that hangs up frees its row; refused input gets a 4xx with OpenAI's error body."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve import Generator
from serve import replies as replies_module
from serve.parsing import parse_grounded_answer, parse_tool_calls
from serve.scheduler import Scheduler
from serve.server import MAX_BODY_BYTES, GracefulServer, create_app

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MODEL = "tiny-float32"  # the artifact folder's name
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class SlowEngine:
    """The real engine with a pause after each step (a sleep, holding no lock), so that a generation lasts long
    enough to overlap other requests on any machine."""

    def __init__(self, engine, pause_s: float):
        self.engine, self.pause_s, self.spec, self.backend = engine, pause_s, engine.spec, engine.backend
        self.save_slots, self.load_slots = engine.save_slots, engine.load_slots  # the prefix cache's copies

    def allocate(self, batch: int):
        return self.engine.allocate(batch)

    def step(self, *args):
        logits = self.engine.step(*args)
        time.sleep(self.pause_s)
        return logits


@pytest.fixture(scope="module")
def gen(tiny_artifact) -> Generator:
    """Runs each prompt alone, without the prefix cache: the reference the server's batched output (with its
    prefix cache, on by default) must equal."""
    return Generator(tiny_artifact, prefix_cache_mb=0)


class Server:
    """uvicorn in a background thread, on a socket bound to a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = GracefulServer(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    app = create_app(Generator(tiny_artifact), api_key=API_KEY)
    with Server(app) as running:
        yield running
    assert not app.state.scheduler.running  # the app's shutdown stopped the scheduler thread


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def slow_server(tiny_artifact):
    """A server whose engine steps take at least 10 ms: 240 tokens stream for over 2.4 s."""
    generator = Generator(tiny_artifact)
    generator.engine = SlowEngine(generator.engine, 0.01)
    with Server(create_app(generator)) as running:
        yield running


def stream_arrivals(url: str, body: dict) -> tuple[threading.Thread, list[tuple[float, dict]], threading.Event]:
    """Read a streamed completion in a thread: (arrival time, event) of each event, and an event set once the
    first one arrived."""
    arrivals, started = [], threading.Event()

    def read():
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    arrivals.append((time.perf_counter(), json.loads(line.removeprefix("data: "))))
                    started.set()
        started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, arrivals, started


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------- the routes


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).model_extra["max_context"] == 256
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    for name in ("cohere_deploy_queue_depth", "cohere_deploy_active_requests", "cohere_deploy_prompt_tokens_total",
                 "cohere_deploy_completion_tokens_total", "cohere_deploy_time_to_first_token_seconds_count"):
        metric(server, name)


def test_completion_plain_and_streamed_equal_the_generator(client, gen):
    sampling = dict(temperature=0.9, seed=3)
    expected = gen.generate("Hello world", max_new_tokens=12, **sampling)
    plain = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, **sampling)
    assert plain.choices[0].text == expected.text and plain.choices[0].finish_reason == expected.finish_reason
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (4, len(expected.token_ids))
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **sampling))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    ids = client.completions.create(model=MODEL, prompt=[5, 300, 301], max_tokens=4)
    assert ids.choices[0].text == gen.generate([5, 300, 301], max_new_tokens=4).text


def test_chat_plain_and_streamed_equal_the_generator(client, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do penguins live?"}]
    sampling = dict(temperature=0.8, seed=5)
    expected = gen.chat(messages, max_new_tokens=20, **sampling)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **sampling)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                                 stream=True, **sampling))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # Text parts and OpenAI's "developer" role mean the same conversation.
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    same = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=20, **sampling)
    assert same.choices[0].message.content == expected.text


ACTION = 'Action: ```json\n[{"tool_name": "get_weather", "parameters": {"city": "Paris"}}]\n```'
GROUNDED = ("Relevant Documents: 0,1\nCited Documents: 1\n"
            "Grounded answer: Emperor penguins are <co: 1>the tallest</co: 1>.")


def test_tool_calls(client, gen, monkeypatch):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # Random weights never write a well-formed Action list: the raw text comes back as the content.
    unparsed = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=6,
                                              temperature=0.8, seed=1)
    expected = gen.chat(messages, tools=[WEATHER_TOOL], max_new_tokens=6, temperature=0.8, seed=1)
    assert unparsed.choices[0].message.content == expected.text and unparsed.choices[0].message.tool_calls is None
    assert unparsed.usage.prompt_tokens == expected.prompt_tokens  # the tool reached the template
    # What the server makes of a well-formed Action list, whatever the model wrote.
    monkeypatch.setattr(replies_module, "parse_tool_calls", lambda text: parse_tool_calls(ACTION))
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=6)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                 max_tokens=6, stream=True))
    [streamed] = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls][0]
    assert streamed.index == 0 and streamed.function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back into the conversation, OpenAI style (arguments as a JSON string).
    history = [*messages, {"role": "assistant", "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    follow_up = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=2)
    assert follow_up.choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the plain template, no tools.
    plain = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none",
                                           max_tokens=2)
    assert plain.usage.prompt_tokens == gen.chat(messages, max_new_tokens=1).prompt_tokens


def test_rag_citations(client, gen, monkeypatch):
    messages = [{"role": "user", "content": "Which penguin is tallest?"}]
    documents = [{"title": "Birds", "text": "Penguins swim."}, {"title": "Size", "text": "Emperors are tallest."}]
    unparsed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.8, seed=2,
                                              extra_body={"documents": documents})
    expected = gen.chat(messages, documents=documents, max_new_tokens=6, temperature=0.8, seed=2)
    assert unparsed.choices[0].message.content == expected.text
    assert unparsed.choices[0].message.model_extra["citations"] == []
    monkeypatch.setattr(replies_module, "parse_grounded_answer", lambda text: parse_grounded_answer(GROUNDED))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           extra_body={"documents": documents, "citation_mode": "fast"})
    message = reply.choices[0].message
    assert message.content == "Emperor penguins are the tallest."
    [citation] = message.model_extra["citations"]
    assert citation == {"start": 21, "end": 32, "text": "the tallest", "document_ids": [1]}
    assert message.content[citation["start"]:citation["end"]] == citation["text"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 extra_body={"documents": documents}))
    [answer] = [c.choices[0].delta for c in chunks if c.choices[0].delta.content]
    assert answer.content == message.content and answer.model_extra["citations"] == [citation]


# ---------------------------------------------------------------------------------------- continuous batching


def test_32_concurrent_streams_get_the_tokens_they_get_alone(server, gen):
    # More requests than rows (4), of different prompt and reply lengths, so rows join and leave mid-batch;
    # every fourth samples with its own seed.
    requests = [dict(prompt=" ".join(["penguin"] * (1 + i % 7)) + f" {i}", max_tokens=3 + (i * 11) % 40,
                     repetition_penalty=3.0, **(dict(temperature=0.9, seed=i) if i % 4 == 0 else {}))
                for i in range(32)]

    async def one(client: openai.AsyncOpenAI, request: dict) -> tuple[str, int, str]:
        sampling = {k: v for k, v in request.items() if k in ("temperature", "seed")}
        stream = await client.completions.create(
            model=MODEL, prompt=request["prompt"], max_tokens=request["max_tokens"], stream=True,
            stream_options={"include_usage": True}, extra_body={"repetition_penalty": 3.0}, **sampling)
        text, finish_reason, tokens = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish_reason = chunk.choices[0].finish_reason or finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens, finish_reason

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, r) for r in requests)), 60)

    served = asyncio.run(all_at_once())
    for request, got in zip(requests, served):
        sampling = {k: v for k, v in request.items() if k not in ("prompt", "max_tokens")}
        alone = gen.generate(request["prompt"], max_new_tokens=request["max_tokens"], **sampling)
        assert got == (alone.text, len(alone.token_ids), alone.finish_reason), request
    assert metric(server, "cohere_deploy_active_requests") == 0 and metric(server, "cohere_deploy_queue_depth") == 0


def test_concurrent_requests_sharing_a_prefix_reuse_its_cache_and_get_what_they_get_alone(server, gen):
    """The prefix cache is on by default in the service; requests diverging from a seen prompt mid-block, and
    requests sharing a new prefix all at once, get exactly the tokens of an uncached prefill."""
    from serve.prefix_cache import BLOCK_TOKENS

    rng = random.Random(0)
    stem = [rng.randrange(7, gen.spec.vocab_size) for _ in range(2 * BLOCK_TOKENS + 10)]
    hit_tokens = metric(server, "cohere_deploy_prefix_cache_hit_tokens")
    entries = metric(server, "cohere_deploy_prefix_cache_entries")
    seen = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": stem, "max_tokens": 1},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert seen.status_code == 200 and metric(server, "cohere_deploy_prefix_cache_entries") == entries + 2
    assert seen.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": stem, "max_tokens": 1},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    # OpenAI's field for it: the stem's two whole blocks came from the cache.
    assert again.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * BLOCK_TOKENS}
    assert again.json()["choices"] == seen.json()["choices"]
    fresh = [rng.randrange(7, gen.spec.vocab_size) for _ in range(BLOCK_TOKENS + 3)]  # not seen: shared at once
    prompts = [stem[:cut] + [rng.randrange(7, gen.spec.vocab_size) for _ in range(5)]
               for cut in (BLOCK_TOKENS - 1, BLOCK_TOKENS + 20, 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS + 10)]
    prompts += [fresh + [i] for i in range(4)]

    # Sampled and penalised: the tokens then depend on every logit (the random tiny model's greedy choice often
    # does not depend on its context at all).
    sampling = [dict(repetition_penalty=3.0, **(dict(temperature=1.0, seed=i) if i % 2 else {}))
                for i in range(len(prompts))]

    async def one(client: openai.AsyncOpenAI, prompt: list[int], params: dict) -> str:
        reply = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, extra_body={"repetition_penalty": params["repetition_penalty"]},
            **{k: v for k, v in params.items() if k != "repetition_penalty"})
        return reply.choices[0].text

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, s) for p, s in zip(prompts, sampling))), 60)

    served = asyncio.run(all_at_once())
    assert served == [gen.generate(p, max_new_tokens=10, **s).text for p, s in zip(prompts, sampling)]
    # Blocks of the seen stem reused: 0 (it diverges in block 0), 1, 2 and 2 (its last token must still run).
    assert metric(server, "cohere_deploy_prefix_cache_hit_tokens") - hit_tokens >= 5 * BLOCK_TOKENS
    assert 0 < metric(server, "cohere_deploy_prefix_cache_hit_rate") <= 1


def test_a_long_generation_does_not_hold_up_a_short_one(slow_server):
    reader, arrivals, started = stream_arrivals(slow_server.url, {"model": MODEL, "prompt": "Once", "max_tokens": 240,
                                                                  "stream": True})
    assert started.wait(30)
    short = httpx.post(f"{slow_server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
                       timeout=30)
    short_done = time.perf_counter()
    reader.join(60)
    assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
    assert arrivals[-1][1]["choices"][0]["finish_reason"] == "length"
    # On a server that runs one request at a time the short one would finish after the long one's last token.
    later = [event for arrived, event in arrivals if arrived > short_done and event["choices"][0]["text"]]
    assert len(later) > 100, f"only {len(later)} of the long stream's chunks came after the short request finished"


def test_a_huge_prompt_does_not_freeze_running_streams(slow_server):
    """A 3.9 MB prompt (under the body limit) is refused by its length before it is tokenized; tokenizing it took
    seconds with the GIL held, which froze every stream."""
    reader, arrivals, started = stream_arrivals(slow_server.url, {"model": MODEL, "prompt": "Once", "max_tokens": 240,
                                                                  "stream": True})
    assert started.wait(30)
    huge = "penguin " * (3_900_000 // 8)
    for path, body in [("/v1/completions", {"model": MODEL, "prompt": huge}),
                       ("/v1/chat/completions", chat(messages=[{"role": "user", "content": huge}]))]:
        response = httpx.post(f"{slow_server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400 and "max_context" in response.json()["error"]["message"]
    refused = time.perf_counter()
    reader.join(60)
    times = [arrived for arrived, _ in arrivals]
    assert times[-1] > refused  # the stream was running while the huge prompts came in
    worst = max(b - a for a, b in zip(times, times[1:]))
    # Steps take ~10 ms here; parsing 3.9 MB of JSON on the event loop costs tens of ms. Tokenizing it held the
    # GIL for seconds (12 s measured). 1 s leaves room for a loaded 2-core machine.
    assert worst < 1.0, f"a stream froze for {worst:.2f} s"


def test_a_client_that_hangs_up_frees_its_row(server):
    cancelled = metric(server, "cohere_deploy_cancelled_requests")
    generated = metric(server, "cohere_deploy_completion_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 230,
            "temperature": 1.0, "seed": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        next(lines)
        next(lines)  # generation has started
    wait_for(lambda: metric(server, "cohere_deploy_cancelled_requests") == cancelled + 1, "the cancellation")
    assert server.app.state.scheduler.active == 0 and metric(server, "cohere_deploy_active_requests") == 0
    assert metric(server, "cohere_deploy_completion_tokens_total") - generated < 230  # stopped early


def test_stopping_the_scheduler_ends_waiting_and_running_requests(gen):
    scheduler = Scheduler(gen)
    scheduler.start()

    async def submit_then_stop():
        tickets = [scheduler.submit(gen.new_sequence(gen.encode("Once"), gen.sampling(max_new_tokens=250)))
                   for _ in range(6)]  # 4 rows: two wait
        kind, _ = await asyncio.wait_for(tickets[0].events.get(), 10)
        await asyncio.to_thread(scheduler.stop)
        last = []
        for ticket in tickets:
            event = ("text", None)
            while event[0] == "text":
                event = await asyncio.wait_for(ticket.events.get(), 10)
            last.append(event)
        return last

    assert {kind for kind, _ in asyncio.run(submit_then_stop())} == {"stopped"}
    assert not scheduler.running


def test_a_failed_prefix_copy_fails_its_request_and_the_scheduler_keeps_serving(tiny_artifact):
    generator = Generator(tiny_artifact)
    prompt = list(range(7, 7 + 70))  # one full block
    generator.generate(prompt, max_new_tokens=1)  # cached now
    engine = SlowEngine(generator.engine, 0)

    def broken(*args):
        raise RuntimeError("device copy failed")

    engine.load_slots = broken
    generator.engine = engine
    scheduler = Scheduler(generator)
    scheduler.start()

    async def last_event(ids: list[int]):
        ticket = scheduler.submit(generator.new_sequence(ids, generator.sampling(max_new_tokens=3)))
        event = ("text", None)
        while event[0] == "text":
            event = await asyncio.wait_for(ticket.events.get(), 10)
        return event

    try:
        assert asyncio.run(last_event(prompt)) == ("error", "the engine failed: device copy failed")
        kind, result = asyncio.run(last_event(prompt[:60]))  # no cached block to copy
        assert kind == "done" and result.completion_tokens == 3
        assert scheduler.active == 0
    finally:
        scheduler.stop()


# ---------------------------------------------------------------------------------------------- refused input


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def nested(depth: int) -> dict:
    value = {}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


@pytest.mark.parametrize("path, body, status, param, message", [
    ("/v1/chat/completions", b'{"model": "tiny', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "valid dictionary"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages: Field required"),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", chat(temperature="hot"), 400, "temperature", "valid number"),
    ("/v1/chat/completions", chat(max_tokens=True), 400, "max_tokens", "valid integer"),
    ("/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", chat(max_tokens=250), 400, "max_tokens", "max_tokens 250 does not fit"),
    ("/v1/chat/completions", chat(temperature=-1), 400, None, "temperature -1"),
    ("/v1/chat/completions", chat(top_p=2), 400, None, "top_p 2"),
    ("/v1/chat/completions", chat(n=2), 400, "n", "Input should be 1"),
    ("/v1/chat/completions", chat(logprobs=True), 400, "logprobs", "unrecognized request argument supplied"),
    ("/v1/chat/completions", chat(messages=[{"role": "robot", "content": "Hi"}]), 400, "messages.0.role", "robot"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hi " * 300}]), 400, "messages",
     "max_context is 256"),
    ("/v1/chat/completions", chat(messages=[{"role": "user"}]), 400, None, "content is missing"),
    ("/v1/chat/completions", chat(tools=[WEATHER_TOOL], documents=[{"text": "x"}]), 400, None, "not both"),
    ("/v1/chat/completions", chat(tools=[WEATHER_TOOL], tool_choice="required"), 400, "tool_choice", "'none'"),
    ("/v1/chat/completions", chat(documents=[{"text": 3}]), 400, "documents.0.text", "valid string"),
    ("/v1/chat/completions", chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]), 400,
     "messages.0.tool_calls.0.function.arguments", "must be a JSON object"),
    ("/v1/chat/completions", chat(model="gpt-4o"), 404, "model", "'gpt-4o' does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 300}, 400, "prompt", "max_context is 256"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 1024]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True}, 400, "echo", "unrecognized"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": 3}, 400, "stop", "valid"),
    ("/v1/completions", b'{"model": "x", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', 413, None, "limit"),
    # A lone surrogate, seeds outside int64, deep nesting, non-finite numbers: 400s, not 500s.
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hi \ud800"}]), 400, "messages.0.content",
     "lone surrogate"),
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, 400, "prompt", "lone surrogate"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": 2 ** 63}, 400, "seed", "less than or equal"),
    ("/v1/completions", b'{"model": "x", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None,
     "nests deeper than 64 levels"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": nested(100)}}]),
     400, "tools", "nests deeper than 64 levels"),
    ("/v1/chat/completions", chat(temperature=float("inf")), 400, None, "temperature inf: must be a finite number"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "repetition_penalty": float("inf")}, 400, None,
     "must be a finite number"),
    # 10,000 stop strings slowed every other request: OpenAI's cap.
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": ["x" * 300] * 10_000}, 400, None,
     "10000 stop strings; at most 4"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": ["x" * 300]}, 400, None, "at most 256"),
])
def test_refused_input_gets_an_openai_error(server, path, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert message in error["message"]


def test_any_int64_seed_is_accepted_as_vllm_does(client, gen):
    reply = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, temperature=1.0, seed=-1)
    assert reply.choices[0].text == gen.generate("Hello world", max_new_tokens=6, temperature=1.0, seed=-1).text


def test_a_refused_request_keeps_the_connection(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as session:
        bad = session.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "\ud800"}))
        assert bad.status_code == 400 and bad.headers.get("connection") != "close"
        assert session.get("/v1/models").status_code == 200


def test_metrics_label_requests_by_route_template(server):
    for name in ("a1", "b2/c3", MODEL):
        httpx.get(f"{server.url}/v1/models/{name}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    httpx.get(f"{server.url}/nothing/here", timeout=10)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    routes = set(re.findall(r'^cohere_deploy_requests_total\{route="([^"]*)"', text, re.MULTILINE))
    # A label per URL would let any client, without a key, grow the metric without bound.
    assert {"/v1/models/{name:path}", "other"} <= routes
    assert routes <= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{name:path}", "/health",
                      "/metrics", "other"}, routes


def test_a_base_checkpoint_serves_completions_and_says_chat_needs_a_template(tiny_artifact, tmp_path):
    from tests.test_generator import without_chat_template

    with Server(create_app(Generator(without_chat_template(tiny_artifact, tmp_path / "base")))) as running:
        completion = httpx.post(f"{running.url}/v1/completions", json={"model": "base", "prompt": "Hi",
                                                                        "max_tokens": 3}, timeout=30)
        assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"] == "length"
        refused = httpx.post(f"{running.url}/v1/chat/completions", json={**chat(), "model": "base"}, timeout=30)
    assert refused.status_code == 400 and "has no chat_template" in refused.json()["error"]["message"]


def test_streams_still_running_when_the_shutdown_grace_ends_get_an_error_event(tiny_artifact):
    generator = Generator(tiny_artifact)
    generator.engine = SlowEngine(generator.engine, 0.02)  # 240 tokens take over 4.8 s
    with Server(create_app(generator, shutdown_grace_s=0.5)) as running:
        reader, arrivals, started = stream_arrivals(running.url, {"model": MODEL, "prompt": "Once",
                                                                  "max_tokens": 240, "stream": True})
        assert started.wait(30)
        running.server.should_exit = True  # what SIGTERM does
        reader.join(30)
    assert not reader.is_alive()
    last = arrivals[-1][1]
    assert last["error"]["code"] == "shutting_down", last
    assert len(arrivals) < 240


def test_api_key_is_checked_on_every_v1_route(server):
    for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, f"{server.url}{path}", json=chat(), headers=headers, timeout=10)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes and scrapes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(ValueError, match="the API key is empty"):  # it would accept an empty bearer token
        create_app(server.app.state.service.generator, api_key="")


def test_unknown_routes_and_methods_get_an_openai_error(server, client):
    assert httpx.get(f"{server.url}/v2/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/v1/completions").json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.code == "model_not_found"


# ------------------------------------------------------------------------------------ the command and SIGTERM


def test_cli_serves_on_loopback_and_sigterm_lets_a_stream_finish(tiny_artifact):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "serve", str(tiny_artifact), "--port", str(port)], cwd=REPO,
                               env={**os.environ, "COHERE_DEPLOY_API_KEY": API_KEY}, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=200, stream=True)
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)  # graceful: the stream in flight runs to its end
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = process.stderr.read()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log and "Finished server process" in log

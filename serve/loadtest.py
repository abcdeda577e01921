"""Load a running server with streamed completions at several concurrencies; print the figures as JSON.

    python -m serve.loadtest http://127.0.0.1:8000 --concurrency 1,8,32 --requests 64 --max-tokens 64

At each concurrency C, C clients send --requests streamed /v1/completions requests in all (each client sends its
next as soon as its last one ends) and the script reports requests/s, generated tokens/s, p50/p99 latency and
p99 time to first token (first streamed text). A reply may end before --max-tokens (end of turn), so tokens/s
counts the tokens the server reports in `usage`. Only loopback URLs are accepted: this is a tool for measuring
your own server, not for loading someone else's.

With --shared-prefix-tokens N every prompt is N token ids common to all requests (a system prompt, tool definitions)
followed by 32 of its own, as token-id prompts (OpenAI's completions API takes them), so the prefix is exactly N
tokens whatever the tokenizer. Run it against `python -m serve ARTIFACT` and `... --prefix-cache-mb 0` to see what
the prefix cache saves; each level reports the prompt tokens the server says came from its cache.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
import urllib.parse

import httpx

# Prompts of different lengths, so rows of the batch prefill and decode at different positions.
PROMPTS = ["Hello", "The penguin is a bird that", "Once upon a time, in a land far away, there lived a",
           "Write a short story about the sea, the wind and a small boat that"]
MAX_REQUESTS = 10_000  # per concurrency: the script stays bounded whatever it is asked
# Token ids of --shared-prefix-tokens prompts: clear of the small ids tokenizers keep for special tokens (Cohere's
# BOS is 5), below 1000 so that any vocabulary holds them (the built-in tiny model's has 1024 entries).
PROMPT_TOKEN_IDS = range(16, 1000)
OWN_PROMPT_TOKENS = 32  # after the shared prefix: each request's own question
REQUEST_TIMEOUT_S = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0,
                        help=f"start every prompt with the same N token ids, then {OWN_PROMPT_TOKENS} of its own "
                             "(default 0: short text prompts)")
    parser.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run (default 600)")
    args = parser.parse_args(argv)
    host = urllib.parse.urlsplit(args.url).hostname
    if not _is_loopback(host):
        parser.error(f"{args.url}: only loopback URLs (127.0.0.1, ::1, localhost) may be loaded")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: expected comma-separated integers like 1,8,32")
    if any(c < 1 for c in args.concurrency):
        parser.error(f"--concurrency {args.concurrency}: each must be >= 1")
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests {args.requests}: must lie in [1, {MAX_REQUESTS}]")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens}: must be >= 1")
    if args.shared_prefix_tokens < 0:
        parser.error(f"--shared-prefix-tokens {args.shared_prefix_tokens}: must be >= 0")
    return args


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def prompts(shared_prefix_tokens: int, count: int, level: int) -> list[str | list[int]]:
    """The prompt of each request: PROMPTS in turn, or the shared prefix of token ids then the request's own (seeded
    by the level too: a later level does not find its whole prompts cached by an earlier one)."""
    if not shared_prefix_tokens:
        return [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    shared = random.Random(0).choices(PROMPT_TOKEN_IDS, k=shared_prefix_tokens)
    return [shared + random.Random(f"{level}/{i}").choices(PROMPT_TOKEN_IDS, k=OWN_PROMPT_TOKENS)
            for i in range(count)]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float | None, dict]:
    """Latency, time to first text (None if the reply had none) and the usage the server reports, of one streamed
    request."""
    started = time.perf_counter()
    first = None
    usage = {}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    if not usage:
        raise RuntimeError("the stream ended without a usage event (stream_options.include_usage)")
    return time.perf_counter() - started, first, usage


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run_level(client: httpx.AsyncClient, model: str, concurrency: int, requests: int, max_tokens: int,
                    shared_prefix_tokens: int = 0) -> dict:
    results = []
    next_index = iter(range(requests))
    level_prompts = prompts(shared_prefix_tokens, requests, concurrency)

    async def worker():
        for i in next_index:  # shared: every request is sent once, by whichever client is free
            body = {"model": model, "prompt": level_prompts[i], "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": i}
            results.append(await one_request(client, body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies = [r[0] for r in results]
    firsts = [r[1] for r in results if r[1] is not None]
    tokens = sum(r[2]["completion_tokens"] for r in results)
    rounded = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "seconds": round(elapsed, 3),
            "requests_per_s": round(len(results) / elapsed, 2), "completion_tokens": tokens,
            "prompt_tokens": sum(r[2]["prompt_tokens"] for r in results),
            # Absent from servers without a prefix cache (OpenAI's field is optional): counted as 0.
            "cached_prompt_tokens": sum((r[2].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                                        for r in results),
            "tokens_per_s": round(tokens / elapsed, 1), "latency_p50_s": rounded(percentile(latencies, 50)),
            "latency_p99_s": rounded(percentile(latencies, 99)), "ttft_p99_s": rounded(percentile(firsts, 99))}


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()["data"]
        model = args.model or models[0]["id"]
        levels = []
        for concurrency in args.concurrency:
            levels.append(await run_level(client, model, concurrency, args.requests, args.max_tokens,
                                          args.shared_prefix_tokens))
            print(json.dumps(levels[-1]), file=sys.stderr)  # progress, as each level ends
    return {"url": args.url, "model": model, "max_tokens": args.max_tokens,
            "shared_prefix_tokens": args.shared_prefix_tokens, "levels": levels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(asyncio.wait_for(main_async(args), args.time_limit))
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: the run took longer than --time-limit {args.time_limit} s", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

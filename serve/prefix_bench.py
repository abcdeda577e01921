"""Time to first token of a long prompt whose start was seen before, with and without the prefix cache; JSON out.

    python -m export --model tiny --out build/tiny-2048 --engine onnx --max-batch 1 --max-context 2048
    python -m serve.prefix_bench build/tiny-2048 --seen 1500 --prompt 1600

Each trial gives a fresh prefix cache the ``--seen`` first tokens of a random prompt (one request, as an earlier
conversation turn would), then times the first token of the whole ``--prompt``-token prompt; without the cache
the same prompt is prefilled whole. Times are medians over ``--trials`` after one untimed warm-up of each.

``--tool-use`` times Command-R tool use instead: the same 5 tools (Cohere's ``parameter_definitions`` form) with
different user questions, rendered by serve's chat code with the artifact's ``tool_use`` template. Each question
runs without the cache, then with one cache kept across questions, as a server keeps it; the first question is the
untimed warm-up of both and fills the cache with the tool definitions, the other ones are timed (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from engines.cli import configure_logging

from .chat import ChatTemplateError
from .generator import DEFAULT_PREFIX_CACHE_MB, Generator
from .prefix_cache import PrefixCache


# Five tools in Cohere's documented form, as an agent with search, a database, a calculator, mail and a calendar
# would declare them; their definitions, rendered before the user's turn, are the prefix questions share.
TOOLS = [
    {"name": "internet_search", "description": "Returns a list of relevant document snippets for a textual query "
     "retrieved from the internet.",
     "parameter_definitions": {"query": {"description": "Query to search the internet with", "type": "str",
                                         "required": True}}},
    {"name": "query_sales_database", "description": "Runs a read-only SQL query against the company's sales "
     "database (tables: orders, customers, products) and returns at most 100 rows as JSON.",
     "parameter_definitions": {"sql": {"description": "A single SELECT statement", "type": "str", "required": True},
                               "timeout_s": {"description": "Seconds before the query is cancelled", "type": "int",
                                             "required": False}}},
    {"name": "calculator", "description": "Evaluates an arithmetic expression with +, -, *, /, ** and parentheses "
     "exactly, returning the result as a decimal string.",
     "parameter_definitions": {"expression": {"description": "The expression, e.g. (3 + 4) * 12.5", "type": "str",
                                              "required": True}}},
    {"name": "send_email", "description": "Sends an email from the user's account. Use only when the user asks to "
     "send something; confirm the recipients in the answer.",
     "parameter_definitions": {"to": {"description": "Recipients' addresses", "type": "List[str]", "required": True},
                               "subject": {"description": "Subject line", "type": "str", "required": True},
                               "body": {"description": "Plain-text body", "type": "str", "required": True}}},
    {"name": "calendar_lookup", "description": "Lists the user's calendar events between two dates, each with its "
     "title, start, end, location and attendees.",
     "parameter_definitions": {"start_date": {"description": "First day, YYYY-MM-DD", "type": "str",
                                              "required": True},
                               "end_date": {"description": "Last day, YYYY-MM-DD", "type": "str", "required": True}}},
]
QUESTIONS = [
    "What were our top five products by revenue last quarter?",
    "Who won the most recent Tour de France, and by how many minutes?",
    "What is 17.5% of 2,340,000 euros?",
    "Do I have any meetings with the design team next week?",
    "Email the sales summary for March to anna@example.com and raj@example.com.",
    "Which customers ordered more than 1,000 units in 2024, and what is the latest news about the largest of them?",
]


def first_token_s(generator: Generator, prompt: list[int]) -> tuple[float, int]:
    result = generator.generate(prompt, max_new_tokens=1)
    return result.time_to_first_token_s, result.cached_tokens


def measure(artifact: str, backend: str, seen: int, prompt_tokens: int, trials: int, seed: int) -> dict:
    generator = Generator(artifact, backend=backend, prefix_cache_mb=0)
    if not 0 < seen < prompt_tokens < generator.spec.max_context:
        raise ValueError(f"--seen {seen} and --prompt {prompt_tokens}: need 0 < seen < prompt < the artifact's "
                         f"max_context {generator.spec.max_context}")
    rng = np.random.default_rng(seed)
    # Token ids from 16 up: clear of the small ids a tokenizer keeps for its special tokens (BOS, EOS, pad).
    prompts = [[int(t) for t in rng.integers(16, generator.spec.vocab_size, prompt_tokens)] for _ in range(trials + 1)]
    uncached, cached, reused = [], [], []
    for prompt in prompts:
        generator.prefix_cache = None
        uncached.append(first_token_s(generator, prompt)[0])
        generator.prefix_cache = PrefixCache(generator.spec.bytes_per_slot, DEFAULT_PREFIX_CACHE_MB * 2 ** 20)
        generator.generate(prompt[:seen], max_new_tokens=1)
        seconds, tokens = first_token_s(generator, prompt)
        cached.append(seconds)
        reused.append(tokens)
    without_s, with_s = statistics.median(uncached[1:]), statistics.median(cached[1:])  # [0]: the warm-up
    return {"artifact": str(artifact), "backend": generator.backend, "max_context": generator.spec.max_context,
            "prompt_tokens": prompt_tokens, "seen_tokens": seen, "reused_tokens": reused[-1],
            "block_tokens": generator.prefix_cache.block_tokens, "trials": trials,
            "first_token_without_cache_s": without_s, "first_token_with_cache_s": with_s,
            "speedup": without_s / with_s}


def measure_tool_use(artifact: str, backend: str) -> dict:
    generator = Generator(artifact, backend=backend, prefix_cache_mb=0)
    template = generator.templates.select(TOOLS) if generator.templates else None  # ChatTemplateError if none
    cache = PrefixCache(generator.spec.bytes_per_slot, DEFAULT_PREFIX_CACHE_MB * 2 ** 20)
    uncached, cached, prompt_tokens, reused = [], [], [], []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        generator.prefix_cache = None
        result = generator.chat(messages, tools=TOOLS, max_new_tokens=1)
        uncached.append(result.time_to_first_token_s)
        generator.prefix_cache = cache
        result = generator.chat(messages, tools=TOOLS, max_new_tokens=1)
        cached.append(result.time_to_first_token_s)
        prompt_tokens.append(result.prompt_tokens)
        reused.append(result.cached_tokens)
    without_s, with_s = statistics.median(uncached[1:]), statistics.median(cached[1:])  # [0]: the warm-up
    return {"artifact": str(artifact), "backend": generator.backend, "template": template, "tools": len(TOOLS),
            "questions": len(QUESTIONS) - 1, "prompt_tokens": prompt_tokens[1:], "reused_tokens": reused[1:],
            "block_tokens": cache.block_tokens, "first_token_without_cache_s": without_s,
            "first_token_with_cache_s": with_s, "speedup": without_s / with_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.prefix_bench", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="artifact folder with max_context above --prompt")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seen", type=int, default=1500, help="prompt tokens the cache has seen (default 1500)")
    parser.add_argument("--prompt", type=int, default=1600, help="prompt tokens of the timed request (default 1600)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tool-use", action="store_true",
                        help=f"time {len(QUESTIONS) - 1} questions sharing {len(TOOLS)} tools instead (the artifact's "
                             "tool_use chat template; --seen, --prompt, --trials and --seed do not apply)")
    args = parser.parse_args(argv)
    configure_logging(False, ("engines", "serve"))
    try:
        if args.tool_use:
            figures = measure_tool_use(args.artifact, args.backend)
        else:
            figures = measure(args.artifact, args.backend, args.seen, args.prompt, max(1, args.trials), args.seed)
    except (ValueError, ChatTemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

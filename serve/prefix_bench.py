"""Time to first token of a long prompt whose start was seen before, with and without the prefix cache; JSON out.

    python -m export --model tiny --out build/tiny-2048 --engine onnx --max-batch 1 --max-context 2048
    python -m serve.prefix_bench build/tiny-2048 --seen 1500 --prompt 1600

Each trial gives a fresh prefix cache the ``--seen`` first tokens of a random prompt (one request, as an earlier
conversation turn would), then times the first token of the whole ``--prompt``-token prompt; without the cache
the same prompt is prefilled whole. Times are medians over ``--trials`` after one untimed warm-up of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from engines.cli import configure_logging

from .generator import DEFAULT_PREFIX_CACHE_MB, Generator
from .prefix_cache import PrefixCache


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.prefix_bench", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="artifact folder with max_context above --prompt")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seen", type=int, default=1500, help="prompt tokens the cache has seen (default 1500)")
    parser.add_argument("--prompt", type=int, default=1600, help="prompt tokens of the timed request (default 1600)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging(False, ("engines", "serve"))
    try:
        figures = measure(args.artifact, args.backend, args.seen, args.prompt, max(1, args.trials), args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

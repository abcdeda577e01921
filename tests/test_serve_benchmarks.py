"""The prefix-cache benchmark scripts (serve/prefix_bench.py, serve/loadtest.py) on the tiny model: the JSON they
print says what was run and what the cache served. Timings are only checked to be there, never compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve import Generator, loadtest, prefix_bench
from serve.server import create_app
from tests.conftest import export_tiny
from tests.test_http import Server

BLOCK = 64  # serve.prefix_cache.BLOCK_TOKENS, restated: the expected reuse below is computed from it


@pytest.fixture(scope="module")
def artifact_1024(tmp_path_factory) -> Path:
    """The tiny model with room for a 5-tool prompt (about 800 tokens with its tokenizer)."""
    return export_tiny(tmp_path_factory.mktemp("artifacts") / "tiny-1024", "--max-batch", "1", "--max-context",
                       "1024")


def _reusable(prompt: list[int], earlier: list[list[int]]) -> int:
    """Tokens of ``prompt`` a block cache that has seen ``earlier`` can serve: the longest common prefix with any of
    them, in whole blocks, leaving the last token to run."""
    best = 0
    for other in earlier:
        common = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        best = max(best, common // BLOCK * BLOCK)
    return min(best, (len(prompt) - 1) // BLOCK * BLOCK)


def test_tool_use_mode_reports_the_rendered_prompts_and_what_the_cache_served(artifact_1024, capsys):
    assert prefix_bench.main([str(artifact_1024), "--tool-use"]) == 0
    figures = json.loads(capsys.readouterr().out)
    generator = Generator(artifact_1024, prefix_cache_mb=0)
    prompts = [generator.apply_chat_template([{"role": "user", "content": q}], tools=prefix_bench.TOOLS,
                                             tokenize=True) for q in prefix_bench.QUESTIONS]
    assert figures["template"] == "tool_use" and figures["tools"] == 5
    assert figures["questions"] == len(prefix_bench.QUESTIONS) - 1 >= 3
    assert figures["prompt_tokens"] == [len(p) for p in prompts[1:]]
    # Each timed question finds what the questions before it left in the cache: the tool definitions.
    expected = [_reusable(p, prompts[:i + 1]) for i, p in enumerate(prompts[1:])]
    assert figures["reused_tokens"] == expected and min(expected) >= 4 * BLOCK
    assert figures["block_tokens"] == BLOCK and figures["backend"] == "onnxruntime-cpu"
    assert figures["first_token_without_cache_s"] > 0 and figures["first_token_with_cache_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["first_token_without_cache_s"]
                                               / figures["first_token_with_cache_s"])


def test_tool_use_prompts_longer_than_the_context_are_an_error_not_a_trace(tiny_artifact, capsys):
    assert prefix_bench.main([str(tiny_artifact), "--tool-use"]) == 2  # max_context 256
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "256" in err


def test_shared_prefix_prompts():
    first, second = loadtest.prompts(100, 3, level=8), loadtest.prompts(100, 3, level=16)
    for level in (first, second):
        assert all(len(p) == 100 + loadtest.OWN_PROMPT_TOKENS for p in level)
        assert all(p[:100] == first[0][:100] for p in level)  # one prefix, for every request and level
        assert len({tuple(p[100:]) for p in level}) == 3  # each request's own question
        assert all(t in loadtest.PROMPT_TOKEN_IDS for p in level for t in p)
    assert not {tuple(p[100:]) for p in first} & {tuple(p[100:]) for p in second}
    assert loadtest.prompts(100, 3, level=8) == first  # the same run after run, so runs compare
    assert loadtest.prompts(0, 5, level=8) == [loadtest.PROMPTS[i % 4] for i in range(5)]


@pytest.mark.parametrize("prefix_cache_mb", [0, 256])
def test_loadtest_with_a_shared_prefix_reports_cached_tokens(tiny_artifact, capsys, prefix_cache_mb):
    shared, requests = 2 * BLOCK, 4
    with Server(create_app(Generator(tiny_artifact, prefix_cache_mb=prefix_cache_mb))) as server:
        assert loadtest.main([server.url, "--concurrency", "2", "--requests", str(requests), "--max-tokens", "3",
                              "--shared-prefix-tokens", str(shared)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shared_prefix_tokens"] == shared
    [level] = report["levels"]
    assert level["requests"] == requests and level["prompt_tokens"] == requests * (shared + loadtest.OWN_PROMPT_TOKENS)
    assert 0 < level["completion_tokens"] <= requests * 3 and level["tokens_per_s"] > 0
    if prefix_cache_mb:
        # The first request misses, the second may (concurrency 2); the later ones start after a prefill stored it.
        assert level["cached_prompt_tokens"] in {2 * shared, 3 * shared}
    else:
        assert level["cached_prompt_tokens"] == 0


def test_loadtest_refuses_a_negative_shared_prefix(capsys):
    with pytest.raises(SystemExit):
        loadtest.main(["http://127.0.0.1:1", "--shared-prefix-tokens", "-1"])
    assert "--shared-prefix-tokens -1: must be >= 0" in capsys.readouterr().err

"""Prefix caching: the engines' slot copies, and greedy output identical with and without the cache (serve's
Generator here; the HTTP service's concurrent requests in tests/test_http.py)."""

from __future__ import annotations

import numpy as np
import pytest

from serve import Generator
from serve.__main__ import parse_args
from serve.prefix_cache import BLOCK_TOKENS

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def plain(tiny_artifact) -> Generator:
    """Without a prefix cache: every prompt is prefilled whole."""
    return Generator(tiny_artifact, prefix_cache_mb=0)


@pytest.fixture
def cached(tiny_artifact) -> Generator:
    """A fresh, empty prefix cache per test."""
    return Generator(tiny_artifact)


def random_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(7, vocab_size, length)]


class RecordingEngine:
    """The generator's engine, with the logits of every step kept: the random tiny model often repeats one token
    whatever its context, so equal tokens alone would not show a wrong cache."""

    def __init__(self, engine):
        self.engine, self.spec, self.backend, self.logits = engine, engine.spec, engine.backend, []
        self.allocate, self.save_slots, self.load_slots = engine.allocate, engine.save_slots, engine.load_slots

    def step(self, *args):
        logits = self.engine.step(*args)
        self.logits.append(logits.copy())
        return logits


def run(generator: Generator, prompt: list[int], **sampling):
    """The result, and the logits of its sampled steps."""
    recording = RecordingEngine(generator.engine)
    generator.engine = recording
    try:
        result = generator.generate(prompt, max_new_tokens=NEW_TOKENS, **sampling)
    finally:
        generator.engine = recording.engine
    return result, np.concatenate(recording.logits[-len(result.token_ids):])


def assert_exact(cached: Generator, plain: Generator, prompt: list[int], reused: int, **sampling):
    """Tokens identical with and without the cache, and logits equal to float32 rounding."""
    result, logits = run(cached, prompt, **sampling)
    expected, expected_logits = run(plain, prompt, **sampling)
    assert result.cached_tokens == reused
    assert result.token_ids == expected.token_ids
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    return result


def engines(tiny_artifact):
    from export.reference_engine import ReferenceEngine

    plain = Generator(tiny_artifact, prefix_cache_mb=0)
    return {"onnxruntime": plain.engine,
            "reference": ReferenceEngine.load("tiny", plain.spec.max_batch, plain.spec.max_context)}


@pytest.mark.parametrize("backend", ["onnxruntime", "reference"])
def test_saved_slots_load_into_another_row_and_state_and_nothing_else_moves(tiny_artifact, backend):
    engine = engines(tiny_artifact)[backend]
    source, target = engine.allocate(2), engine.allocate(3)
    ids = np.array([random_prompt(100, seed, engine.spec.vocab_size) for seed in (1, 2)])
    engine.step(source, ids, np.zeros(2, np.int64), np.full(2, 99))
    block = engine.save_slots(source, 1, 10, 20)
    engine.load_slots(target, 2, 30, block)
    engine.step(source, ids[:, :5], np.full(2, 100), np.zeros(2))  # the block is a copy: later steps leave it be
    engine.load_slots(target, 0, 0, block)
    for (k, v), (k_src, v_src) in zip(engine.read_cache(target), engine.read_cache(source)):
        for cache, src in ((k, k_src), (v, v_src)):
            assert np.array_equal(cache[2, :, 30:50], src[1, :, 10:30]) and src[1, :, 10:30].any()
            assert np.array_equal(cache[0, :, :20], src[1, :, 10:30])
            assert not cache[2, :, :30].any() and not cache[2, :, 50:].any()  # nothing outside the range
            assert not cache[0, :, 20:].any() and not cache[1].any()


@pytest.mark.parametrize("row, start, count, message", [(2, 0, 4, "row 2 outside"), (0, -1, 4, "slots"),
                                                         (0, 250, 10, "max_context 256"), (0, 0, 0, "non-empty")])
def test_slot_ranges_outside_the_state_are_refused(plain, row, start, count, message):
    with pytest.raises(ValueError, match=message):
        plain.engine.save_slots(plain.engine.allocate(2), row, start, count)


def test_greedy_output_is_identical_with_and_without_the_cache(plain, cached):
    prompt = random_prompt(2 * BLOCK_TOKENS + 22, 3, plain.spec.vocab_size)
    assert_exact(cached, plain, prompt, 0, repetition_penalty=1.3)
    assert_exact(cached, plain, prompt, 2 * BLOCK_TOKENS, repetition_penalty=1.3)
    stats = cached.prefix_cache.stats()
    assert (stats.hit_tokens, stats.queried_tokens, stats.entries) == (2 * BLOCK_TOKENS, 2 * len(prompt), 2)
    assert stats.bytes == 2 * BLOCK_TOKENS * plain.spec.bytes_per_slot


def test_a_prompt_that_diverges_mid_block_reuses_only_the_blocks_before(plain, cached):
    seen = random_prompt(3 * BLOCK_TOKENS, 4, plain.spec.vocab_size)
    cached.generate(seen, max_new_tokens=1)
    diverged = seen[:BLOCK_TOKENS + 30] + random_prompt(60, 5, plain.spec.vocab_size)  # differs inside block 2
    shorter = seen[:2 * BLOCK_TOKENS]  # whole blocks, all cached: its last token still runs
    # Block 1 of `seen` twice: its second copy's tokens are cached, but at other positions, after another prefix.
    repeated = seen[:BLOCK_TOKENS] * 2 + seen[:5]
    for prompt, reused in ((diverged, BLOCK_TOKENS), (shorter, BLOCK_TOKENS), (seen, 2 * BLOCK_TOKENS),
                           (repeated, BLOCK_TOKENS)):
        assert_exact(cached, plain, prompt, reused)


def test_a_batch_and_a_stream_reuse_the_cache_and_stay_exact(plain, cached):
    stem = random_prompt(BLOCK_TOKENS + 10, 6, plain.spec.vocab_size)
    prompts = [stem + random_prompt(5 + i, 10 + i, plain.spec.vocab_size) for i in range(3)]
    cached.generate(stem, max_new_tokens=1)
    results = cached.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert [r.cached_tokens for r in results] == [BLOCK_TOKENS] * 3
    assert [r.token_ids for r in results] == [r.token_ids for r in plain.generate(prompts, max_new_tokens=NEW_TOKENS)]
    stream = cached.stream(prompts[0], max_new_tokens=NEW_TOKENS)
    assert "".join(stream) == results[0].text and stream.result.cached_tokens == BLOCK_TOKENS


def test_lru_eviction_under_a_two_block_limit_keeps_outputs_exact(tiny_artifact, plain):
    two_blocks = 2 * BLOCK_TOKENS * plain.spec.bytes_per_slot
    cached = Generator(tiny_artifact, prefix_cache_mb=two_blocks / 2 ** 20)
    a, b, c = (random_prompt(BLOCK_TOKENS + 5, seed, plain.spec.vocab_size) for seed in (20, 21, 22))
    # c evicts b, the least recently used (a was used after it), then b evicts c.
    for prompt, reused in ((a, 0), (b, 0), (a, BLOCK_TOKENS), (c, 0), (a, BLOCK_TOKENS), (b, 0)):
        assert_exact(cached, plain, prompt, reused)
        assert cached.prefix_cache.stats().bytes <= two_blocks
    assert cached.prefix_cache.stats().evictions == 2  # b by c, then c by b
    long = random_prompt(3 * BLOCK_TOKENS + 10, 23, plain.spec.vocab_size)  # more blocks than fit: its first two stay
    cached.generate(long, max_new_tokens=1)
    assert_exact(cached, plain, long, 2 * BLOCK_TOKENS)


def test_prefix_cache_size_option(tiny_artifact):
    assert parse_args(["art", "--port", "0"]).prefix_cache_mb > 0  # on by default
    assert parse_args(["art", "--port", "0", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    with pytest.raises(SystemExit):
        parse_args(["art", "--port", "0", "--prefix-cache-mb", "-1"])
    with pytest.raises(ValueError, match="prefix_cache_mb -1"):
        Generator(tiny_artifact, prefix_cache_mb=-1)

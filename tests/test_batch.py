"""Chunked prefill that does not pad decoding rows: the engines' ``first_row`` (a step over a range of rows that does
not start at row 0), and ``serve.batch.Batch`` running decoding rows in a call of width 1 and prefills in calls of
their own, within a first-come-first-served token budget.

The engines are the real ONNX Runtime engine on the tiny artifact and the reference model; expected values come
from the same rows stepped in a full batch or alone (no ``first_row``), and each sequence's output and logits from
running it alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from engines import Artifact, open_engine
from engines.greedy import right_pad
from engines.tensorrt import TensorRTEngine
from export.parity import TOLERANCES
from export.reference_engine import ReferenceEngine
from reference import load_model
from serve import Generator
from serve.batch import Batch
from serve.prefix_cache import BLOCK_TOKENS
from serve.sampling import SamplingParams
from tests.test_tensorrt import _export_and_build, needs_runtime

TOLERANCE = 1e-5  # the same row in another batch shape: float32 rounding, not a wrong row (logits are O(1))


@pytest.fixture(scope="module")
def onnxruntime_engine(tiny_artifact):
    with open_engine(Artifact.open(tiny_artifact), "onnxruntime-cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def reference_engine():
    return ReferenceEngine(load_model("tiny")[0], max_batch=4, max_context=256)


@pytest.fixture(scope="module")
def gen(tiny_artifact) -> Generator:
    return Generator(tiny_artifact, prefix_cache_mb=0)


def random_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(7, vocab_size, length)]


# --- Engine.step(..., first_row)


@pytest.mark.parametrize("engine_name", ["onnxruntime_engine", "reference_engine"])
def test_first_row_steps_only_its_rows(request, engine_name):
    """Row 2 stepped alone with first_row=2 (a prefill, then a decode) gives the logits and cache that row gets in a
    full batch and alone in row 0 of its own state, and leaves the state's other rows untouched."""
    engine = request.getfixturevalue(engine_name)
    vocab = engine.spec.vocab_size
    prompts = [random_prompt(length, seed, vocab) for seed, length in enumerate([9, 5, 12, 7])]
    lengths = np.array([len(p) for p in prompts])
    prompt, last = prompts[2], len(prompts[2]) - 1

    full = engine.allocate(4)
    full_prefill = engine.step(full, right_pad(prompts), np.zeros(4, np.int64), lengths - 1)
    nxt = full_prefill.argmax(axis=1)
    full_decode = engine.step(full, nxt[:, None], lengths, np.zeros(4, np.int64))

    alone = engine.allocate(1)
    alone_prefill = engine.step(alone, np.array([prompt]), np.array([0]), np.array([last]))
    alone_decode = engine.step(alone, np.array([[nxt[2]]]), np.array([last + 1]), np.array([0]))

    state = engine.allocate(4)
    prefill = engine.step(state, np.array([prompt]), np.array([0]), np.array([last]), first_row=2)
    decode = engine.step(state, np.array([[nxt[2]]]), np.array([last + 1]), np.array([0]), first_row=2)

    assert prefill.shape == decode.shape == (1, vocab)
    for got, in_batch, by_itself in ((prefill, full_prefill, alone_prefill), (decode, full_decode, alone_decode)):
        assert np.abs(got[0] - in_batch[2]).max() <= TOLERANCE
        assert np.abs(got[0] - by_itself[0]).max() <= TOLERANCE
    for (key, value), (full_key, full_value), (alone_key, alone_value) in zip(
            engine.read_cache(state), engine.read_cache(full), engine.read_cache(alone)):
        for cache, in_batch, by_itself in ((key, full_key, alone_key), (value, full_value, alone_value)):
            assert np.abs(cache[2, :, :last + 2]).max() > 0
            assert np.abs(cache[2] - in_batch[2]).max() <= TOLERANCE
            assert np.abs(cache[2] - by_itself[0]).max() <= TOLERANCE
            assert np.abs(cache[[0, 1, 3]]).max() == 0  # only row 2 was written


@pytest.mark.parametrize("engine_name", ["onnxruntime_engine", "reference_engine"])
@pytest.mark.parametrize("first_row, rows", [(-1, 1), (4, 1), (3, 2), (1.0, 1), (True, 1), ("1", 1), (None, 1)])
def test_step_refuses_a_bad_first_row(request, engine_name, first_row, rows):
    engine = request.getfixturevalue(engine_name)
    state = engine.allocate(4)
    with pytest.raises(ValueError, match="first_row"):
        engine.step(state, np.ones((rows, 1), np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64),
                    first_row=first_row)
    assert all(np.abs(k).max() == 0 and np.abs(v).max() == 0 for k, v in engine.read_cache(state))


@pytest.mark.gpu
@needs_runtime
def test_tensorrt_steps_from_a_first_row_run_eagerly_beside_the_decode_graphs(tmp_path):
    """Rows stepped in ranges (first_row 0 and 2) equal the same rows stepped together. A decode from row 2 neither
    replays nor captures a CUDA graph, even twice in a row with unchanged bindings, so the graph then captured for
    rows [0, 2) holds rows 0-1, not 2-3, and the graph of rows [0, 4) still replays the right rows."""
    spec, section = _export_and_build(tmp_path, "tiny", dtype="float32", max_batch=4, max_context=64)
    prompts = [random_prompt(length, seed, spec.vocab_size) for seed, length in enumerate([9, 5, 12, 7])]
    lengths = np.array([len(p) for p in prompts])
    fed = np.random.default_rng(9).integers(7, spec.vocab_size, (7, 4))  # the token each row decodes at step i
    zeros = np.zeros(4, np.int64)
    with TensorRTEngine(tmp_path, spec, section) as engine:
        together = engine.allocate(4)
        expected = [engine.step(together, right_pad(prompts), zeros, lengths - 1)]
        expected += [engine.step(together, fed[i, :, None], lengths + i, zeros) for i in range(7)]

        split = engine.allocate(4)

        def step(first_row: int, rows: int, i: int | None, used_graph: bool | None = None) -> None:
            """Rows [first_row, first_row + rows) of ``split``: their prompts (i None) or decode step i."""
            r = slice(first_row, first_row + rows)
            if i is None:
                ids, write, last = right_pad(prompts[r]), zeros[r], lengths[r] - 1
            else:
                ids, write, last = fed[i, r, None], lengths[r] + i, zeros[r]
            logits = engine.step(split, ids, write, last, first_row=first_row)
            assert np.abs(logits - expected[0 if i is None else i + 1][r]).max() <= TOLERANCES["float32"].logits_max_abs
            assert used_graph is None or engine.last_step_used_graph == used_graph

        step(0, 2, None)
        step(2, 2, None)
        step(0, 4, 0, False)  # eager after the bindings changed, then captured and replayed
        step(0, 4, 1, True)
        step(0, 4, 2, True)
        step(2, 2, 3, False)  # from row 2: eager, the second time with unchanged bindings too
        step(2, 2, 4, False)
        step(0, 2, 3, False)  # rows [0, 2): eager after the switch, then a graph of their own
        step(0, 2, 4, True)
        step(0, 4, 5, False)
        step(0, 4, 6, True)
        assert set(split.graphs) == {(4, 64), (2, 64)}


# --- Batch.step


class RecordingEngine:
    """The real engine, with ``(first_row, rows, width)`` of every step written down."""

    def __init__(self, engine):
        self.engine, self.spec, self.backend, self.calls = engine, engine.spec, engine.backend, []
        self.allocate, self.save_slots, self.load_slots = engine.allocate, engine.save_slots, engine.load_slots

    def step(self, state, input_ids, write_indices, logits_indices, first_row=0):
        self.calls.append((first_row, *np.shape(input_ids)))
        return self.engine.step(state, input_ids, write_indices, logits_indices, first_row)


class Run:
    """A Batch on a recording engine; ``step`` checks what every chunked-prefill step must hold and returns the
    step's engine calls. Each sequence's logits are recorded as it samples."""

    def __init__(self, gen: Generator, rows: int, max_step_tokens: int | None, prefix_cache=None):
        self.gen, self.engine, self.max_step_tokens = gen, RecordingEngine(gen.engine), max_step_tokens
        self.batch = Batch(self.engine, rows, gen.pad_token_id, max_step_tokens, prefix_cache)
        self.logits: dict[int, list[np.ndarray]] = {}

    def add(self, prompt: list[int], new_tokens: int, started: float | None = None):
        seq = self.gen.new_sequence(prompt, SamplingParams(max_new_tokens=new_tokens), started)
        self.logits[id(seq)] = record_logits(seq)
        row = self.batch.add(seq)
        return seq, row

    def step(self) -> list[tuple[int, int, int]]:
        live = [(row, seq, len(seq.pending), seq.position) for row, seq in enumerate(self.batch.rows) if seq]
        del self.engine.calls[:]
        self.batch.step()
        calls = list(self.engine.calls)
        decoding = {row for row, _, pending, _ in live if pending == 1}
        for first_row, count, width in calls:
            if decoding & set(range(first_row, first_row + count)):
                assert width == 1, f"a decoding row was padded to {width} tokens: {calls}"
        prefilled = sum(seq.position - position for _, seq, pending, position in live if pending > 1)
        assert self.max_step_tokens is None or prefilled <= self.max_step_tokens, calls
        return calls

    def steps_until(self, done) -> list[list[tuple[int, int, int]]]:
        calls = []
        while not done():
            calls.append(self.step())
        return calls


def record_logits(seq) -> list[np.ndarray]:
    """Wraps ``seq.accept_logits`` to keep the logits it samples from."""
    kept, accept = [], seq.accept_logits

    def accept_and_keep(logits):
        kept.append(np.array(logits, copy=True))
        accept(logits)

    seq.accept_logits = accept_and_keep
    return kept


def alone(gen: Generator, seq) -> tuple[list[int], list[np.ndarray]]:
    """The tokens and sampled-from logits of ``seq``'s prompt generated alone: one row, the whole prompt in one
    step, no prefix cache."""
    single = gen.new_sequence(seq.prompt_ids, seq.params)
    logits = record_logits(single)
    batch = Batch(gen.engine, 1, gen.pad_token_id)
    batch.add(single)
    while batch.live:
        batch.step()
    return single.token_ids, logits


def assert_as_alone(run: Run, gen: Generator, *sequences) -> None:
    for seq in sequences:
        assert seq.finished
        tokens, logits = alone(gen, seq)
        assert seq.token_ids == tokens
        got = run.logits[id(seq)]
        assert len(got) == len(logits) and max(np.abs(a - b).max() for a, b in zip(got, logits)) <= TOLERANCE


def test_decoding_rows_run_at_width_1_while_a_joining_prompt_prefills_in_chunks(gen):
    vocab = gen.spec.vocab_size
    run = Run(gen, 4, max_step_tokens=16)
    a, _ = run.add(random_prompt(8, 1, vocab), 30)  # row 0
    b, _ = run.add(random_prompt(10, 2, vocab), 3)  # row 1: finishes early, and the long prompt takes its row
    c, _ = run.add(random_prompt(5, 3, vocab), 30)  # row 2
    run.steps_until(lambda: b.finished)
    late, row = run.add(random_prompt(100, 4, vocab), 5)
    assert row == 1 and not a.finished and not c.finished
    calls = run.steps_until(lambda: late.token_ids)
    # Rows 0 and 2 decode in one call over rows [0, 2] (row 1 writes a pad at its position); row 1 prefills 16
    # tokens a step in a call of its own.
    assert calls == [[(0, 3, 1), (1, 1, chunk)] for chunk in [16] * 6 + [4]]
    run.steps_until(lambda: not run.batch.live)
    assert_as_alone(run, gen, a, b, c, late)


def test_a_prefix_cache_hit_joining_mid_generation_prefills_its_tail_beside_width_1_decodes(tiny_artifact, gen):
    cached = Generator(tiny_artifact)  # a fresh, empty prefix cache
    vocab = gen.spec.vocab_size
    shared = random_prompt(2 * BLOCK_TOKENS, 5, vocab)
    run = Run(cached, 4, max_step_tokens=32, prefix_cache=cached.prefix_cache)
    first_row0, _ = run.add(random_prompt(6, 6, vocab), 40)  # row 0: decoding throughout
    storer, _ = run.add(shared + random_prompt(10, 7, vocab), 40)  # row 1: its completed prefill stores the blocks
    calls = run.steps_until(lambda: storer.token_ids)
    assert calls == [[(0, 1, 6), (1, 1, 26)], *[[(0, 1, 1), (1, 1, chunk)] for chunk in (32, 32, 32, 16)]]
    reuser, row = run.add(shared + random_prompt(40, 8, vocab), 5)  # row 2
    assert row == 2 and reuser.cached_tokens == 2 * BLOCK_TOKENS
    calls = run.steps_until(lambda: reuser.token_ids)
    assert calls == [[(0, 2, 1), (2, 1, 32)], [(0, 2, 1), (2, 1, 8)]]  # only the 40 tokens after the cached ones
    run.steps_until(lambda: not run.batch.live)
    assert_as_alone(run, gen, first_row0, storer, reuser)


def test_the_prefill_budget_goes_to_the_oldest_request_first(gen):
    vocab = gen.spec.vocab_size
    run = Run(gen, 2, max_step_tokens=32)
    younger, _ = run.add(random_prompt(50, 9, vocab), 6, started=2.0)  # row 0
    older, _ = run.add(random_prompt(50, 10, vocab), 6, started=1.0)  # row 1
    calls = run.steps_until(lambda: not run.batch.live)
    # The older prompt's 50 tokens take the budget first (32, then 18), the younger gets the rest (14, 32, 4). Rows
    # 0 and 1 do not share a call whose padding would exceed the budget (2 x 18 > 32).
    assert calls[:5] == [[(1, 1, 32)], [(0, 1, 14), (1, 1, 18)], [(0, 2, 1), (0, 1, 32)], [(0, 2, 1), (0, 1, 4)],
                         [(0, 2, 1)]]
    assert_as_alone(run, gen, younger, older)


def test_without_a_budget_each_prompt_prefills_whole_and_adjacent_prompts_share_a_call(gen):
    """Generator.generate's offline batch: no max_step_tokens. A one-token prompt decodes from the first step."""
    vocab = gen.spec.vocab_size
    run = Run(gen, 4, max_step_tokens=None)
    sequences = [run.add(random_prompt(length, 11 + length, vocab), 8)[0] for length in (30, 20, 1, 25)]
    calls = run.steps_until(lambda: not run.batch.live)
    assert calls == [[(0, 3, 1), (0, 2, 30), (3, 1, 25)]] + [[(0, 4, 1)]] * 7
    assert_as_alone(run, gen, *sequences)

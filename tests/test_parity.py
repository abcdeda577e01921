"""The reference model as an engine, the one greedy / teacher-forced loop, and parity as "two engines, one loop".

Every expected value comes from the plain reference forward (``model(input_ids)``: no cache, logits at every
position), a path independent of the engine interface and of the loops under test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engines import Artifact, open_engine
from engines.artifact import MANIFEST, sha256_file
from engines.greedy import greedy, right_pad, teacher_forced
from export import parity
from export.reference_engine import ReferenceEngine
from reference import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")[0]


def plain_last_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1].numpy()


def plain_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy by recomputing the whole sequence every token: no cache, no padding, one row."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(plain_last_logits(model, tokens).argmax()))
    return tokens[len(prompt):]


def test_reference_engine_equals_the_plain_forward(model):
    engine = ReferenceEngine(model, max_batch=4, max_context=64)
    assert engine.backend == "reference" and engine.spec.dtype == "float32"
    assert engine.spec.vocab_size == model.config.vocab_size and engine.spec.max_context == 64
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, engine.spec.vocab_size, 9).tolist(), rng.integers(0, engine.spec.vocab_size, 4).tolist()

    state = engine.allocate(3)  # a ragged prefill of rows 0-1, then row 0 alone: fewer rows than the state holds
    first = engine.step(state, right_pad([a[:6], b]), np.array([0, 0]), np.array([5, 3]))
    last = engine.step(state, np.array([a[6:]]), np.array([6]), np.array([2]))
    assert first.dtype == np.float32 and first.shape == (2, engine.spec.vocab_size) and last.shape[0] == 1
    assert np.abs(first[0] - plain_last_logits(model, a[:6])).max() <= 1e-5
    assert np.abs(first[1] - plain_last_logits(model, b)).max() <= 1e-5
    assert np.abs(last[0] - plain_last_logits(model, a)).max() <= 1e-5

    keys = engine.read_cache(state)[0][0]
    with torch.no_grad():
        _, caches = model(torch.tensor([a]), torch.zeros(1, dtype=torch.int64), torch.tensor([8]),
                          model.new_caches(1, 64))
    assert np.abs(keys[0, :, :9] - caches[0][0][0, :, :9].numpy()).max() <= 1e-5
    assert np.abs(keys[2]).max() == 0  # row 2 never written
    keys[0] = 1.0  # a copy: the state is untouched
    assert np.abs(engine.read_cache(state)[0][0][0, :, 9:]).max() == 0


def test_reference_engine_refuses_what_every_engine_refuses(model):
    engine = ReferenceEngine(model, max_batch=2, max_context=16)
    with pytest.raises(ValueError, match="max_batch=2"):
        engine.allocate(3)
    state = engine.allocate(1)
    with pytest.raises(ValueError, match="max_context 16"):
        engine.step(state, np.zeros((1, 4), np.int64), np.array([14]), np.array([3]))


def test_greedy_equals_the_plain_greedy_on_a_ragged_batch(model):
    engine = ReferenceEngine(model, max_batch=3, max_context=64)
    prompts = [[5, 17, 42, 99, 3], [5, 300, 12], [5]]
    seen = []
    out = greedy(engine, prompts, 6, on_token=lambda tokens: seen.append(tokens.tolist()))
    assert out == [plain_greedy(model, p, 6) for p in prompts]
    assert seen == [list(column) for column in zip(*out)]  # one call per token, all rows, in order


def test_teacher_forced_feeds_every_engine_the_first_engines_tokens(model):
    leader = ReferenceEngine(model, max_batch=2, max_context=64)
    other, _ = load_model("tiny")
    with torch.no_grad():
        other.model.norm.weight.mul_(-1)  # negated logits: a follower that ranks tokens unlike the leader
    follower = ReferenceEngine(other, max_batch=2, max_context=64)
    prompts = [[5, 17, 42], [7]]
    steps = list(teacher_forced([leader, follower], prompts, 3))
    assert len(steps) == 4
    tokens = [s.logits[0].argmax(-1) for s in steps]
    assert [s.logits[1].argmax(-1).tolist() for s in steps] != [t.tolist() for t in tokens]
    for prev, step in zip(tokens, steps[1:]):
        assert step.input_ids[:, 0].tolist() == prev.tolist()
    assert steps[-1].filled.tolist() == [3 + 3, 1 + 3]
    # The follower saw the leader's sequence: its last logits are the plain forward over prompt + leader's tokens.
    row0 = prompts[0] + [int(t[0]) for t in tokens[:-1]]
    assert np.abs(steps[-1].logits[1][0] - plain_last_logits(other, row0)).max() <= 1e-5

    # A continuation appends 3 tokens to row 0 and 2 to row 1, each at its own position.
    steps = list(teacher_forced([leader, follower], prompts, 3, continuation=3))
    last = steps[-1]
    assert len(steps) == 5 and last.write_indices.tolist() == [3 + 3, 1 + 3]
    assert last.logits_indices.tolist() == [2, 1] and last.filled.tolist() == [3 + 3 + 3, 1 + 3 + 2]
    row1 = prompts[1] + [int(s.logits[0].argmax(-1)[1]) for s in steps[:-1]] + last.input_ids[1, 1:2].tolist()
    assert np.abs(last.logits[1][1] - plain_last_logits(other, row1)).max() <= 1e-5


def test_measure_takes_the_model_or_its_engine(model, tiny_artifact):
    engine = open_engine(Artifact.open(tiny_artifact), "onnxruntime-cpu")
    as_model = parity.measure(model, engine)
    as_engine = parity.measure(ReferenceEngine(model, engine.spec.max_batch, engine.spec.max_context), engine)
    assert as_model == as_engine and as_model["reference_dtype"] == "float32"


def test_parity_figures_equal_a_plain_replay(model, tiny_artifact):
    """The report's figures, recomputed from the reference model's own forward and ONNX Runtime's raw steps."""
    engine = open_engine(Artifact.open(tiny_artifact), "onnxruntime-cpu")
    report = parity.measure(model, engine)
    rows = {r["output"]: r for r in report["rows"]}

    spec = engine.spec
    prompts, decode_steps, continuation = parity.scenario(spec.vocab_size, spec.max_batch, spec.max_context)
    assert continuation > 1
    batch, lengths = len(prompts), np.array([len(p) for p in prompts])
    caches, state = model.new_caches(batch, spec.max_context), engine.allocate(batch)
    ids, write, last = right_pad(prompts), np.zeros(batch, np.int64), lengths - 1
    logits_max, cache_max = 0.0, 0.0
    for i in range(1 + decode_steps + 1):
        with torch.no_grad():
            want, caches = model(torch.from_numpy(ids), torch.from_numpy(write), torch.from_numpy(last), caches)
        got = engine.step(state, ids, write, last)
        logits_max = max(logits_max, float(np.abs(got.astype(np.float64) - want.numpy()).max()))
        filled = write + last + 1
        for (k, v), (rk, rv) in zip(engine.read_cache(state), caches):
            for b in range(batch):
                for ours, ref in ((k, rk), (v, rv)):
                    cache_max = max(cache_max, float(np.abs(ours[b, :, :filled[b]].astype(np.float64)
                                                            - ref[b, :, :filled[b]].numpy()).max()))
        ids, write, last = want.argmax(-1)[:, None].numpy(), filled, np.zeros(batch, np.int64)
        if i == decode_steps:  # the continuation: row b appends its greedy token and more of its own prompt
            chunks = [[int(t)] + (p * continuation)[:max(1, continuation - b) - 1]
                      for b, (t, p) in enumerate(zip(ids[:, 0], prompts))]
            ids, last = right_pad(chunks), np.array([len(c) - 1 for c in chunks])

    assert rows["logits"]["max_abs"] == pytest.approx(logits_max, abs=1e-9) and logits_max <= 1e-4
    assert rows["kv_cache"]["max_abs"] == pytest.approx(cache_max, abs=1e-9) and cache_max <= 1e-4
    assert report["greedy_tokens_equal"] and rows["top1_agreement"]["value"] == 1.0
    assert greedy(engine, prompts, decode_steps) == [plain_greedy(model, p, decode_steps) for p in prompts]
    assert report["passed"]


def test_error_stats_count_nan_and_inf_on_each_side_and_measure_the_rest():
    stats = parity.ErrorStats()
    stats.add(np.array([1.0, np.nan, np.inf, 4.0]), np.array([1.5, 2.0, 3.0, -np.inf]))
    assert (stats.non_finite, stats.ref_non_finite) == (2, 1)
    assert stats.max_abs == 0.5 and stats.ref_max_abs == 3.0  # over the values finite on both sides / the reference


@pytest.mark.parametrize("side", ["both", "engine", "reference"])
def test_nan_on_either_side_fails_parity_and_is_counted(model, side):
    """A NaN weight on both sides is how a damaged checkpoint used to export with 'parity: PASS': NaN against NaN
    made every error statistic drop it and every argmax agree."""
    damaged, _ = load_model("tiny")
    with torch.no_grad():
        damaged.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    engine = ReferenceEngine(damaged if side != "reference" else model, max_batch=3, max_context=64)
    reference = ReferenceEngine(damaged if side != "engine" else model, max_batch=3, max_context=64)
    report = parity.measure(reference, engine)
    rows = {r["output"]: r for r in report["rows"]}

    # Independently: the damaged model's plain forward is NaN at every position, so every logit compared is.
    prompts, decode_steps, continuation = parity.scenario(engine.spec.vocab_size, 3, 64)
    with torch.no_grad():
        assert all(damaged(torch.tensor([p])).isnan().all() for p in prompts)
    every_logit = (1 + decode_steps + (continuation > 0)) * len(prompts) * engine.spec.vocab_size
    assert rows["logits"]["non_finite"] == (every_logit if side != "reference" else 0)
    assert rows["logits"]["reference_non_finite"] == (every_logit if side != "engine" else 0)
    assert (rows["kv_cache"]["non_finite"] > 0) == (side != "reference")
    assert (rows["kv_cache"]["reference_non_finite"] > 0) == (side != "engine")
    assert not rows["logits"]["passed"] and not rows["kv_cache"]["passed"] and not report["passed"]
    table = parity.format_table(report)
    assert f"FAIL ({every_logit * (2 if side == 'both' else 1)} values NaN or inf" in table
    assert table.endswith("overall: FAIL")


def test_nan_logits_of_a_real_onnx_runtime_engine_fail_parity(model, tiny_artifact, tmp_path):
    """The artifact's final norm weight (in the graph's external data) given a NaN and the file re-hashed, as a
    damaged or mis-built artifact would be: ONNX Runtime's logits are all NaN while its caches stay finite."""
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    data = copy / f"{manifest['graph']['onnx_file']}.data"
    raw = data.read_bytes()
    norm = model.model.norm.weight.numpy().tobytes()
    assert raw.count(norm) == 1
    data.write_bytes(raw.replace(norm, np.float32(np.nan).tobytes() + norm[4:]))
    manifest["files"][data.name]["sha256"] = sha256_file(data)
    (copy / MANIFEST).write_text(json.dumps(manifest))

    engine = open_engine(Artifact.open(copy), "onnxruntime-cpu")
    report = parity.measure(model, engine)
    rows = {r["output"]: r for r in report["rows"]}
    prompts, decode_steps, continuation = parity.scenario(engine.spec.vocab_size, engine.spec.max_batch,
                                                          engine.spec.max_context)
    steps = 1 + decode_steps + (continuation > 0)
    assert rows["logits"]["non_finite"] == steps * len(prompts) * engine.spec.vocab_size
    assert rows["logits"]["reference_non_finite"] == 0 and not rows["logits"]["passed"]
    assert rows["kv_cache"]["non_finite"] == 0 and rows["kv_cache"]["passed"]
    assert not report["passed"]

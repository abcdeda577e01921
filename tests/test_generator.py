"""The Generator on the tiny artifact: parity with the reference model, batching, sampling, stop strings,
streaming, refused inputs, and the `python -m serve` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import ArtifactError
from serve import Generator, SamplingParams
from serve.chat import ChatTemplates
from serve.sampling import defaults_from_generation_config, sample_token, token_probabilities

REPO = Path(__file__).resolve().parents[1]
END_OF_TURN = 9  # the tiny tokenizer's <|END_OF_TURN_TOKEN|>, also its eos


@pytest.fixture(scope="module")
def gen(tiny_artifact) -> Generator:
    return Generator(tiny_artifact)


@pytest.fixture(scope="module")
def reference():
    from reference import load_model

    model, _ = load_model("tiny")
    return model


def reference_greedy(model, prompt: list[int], new_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """Greedy decoding by full forwards of the reference model, with transformers' repetition penalty."""
    ids = list(prompt)
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].double()
        seen = torch.tensor(sorted(set(ids)))
        chosen = logits[seen]
        logits[seen] = torch.where(chosen > 0, chosen / repetition_penalty, chosen * repetition_penalty)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def assert_matches_reference(result, expected: list[int]) -> None:
    """The generator stops at the eos token; up to there the tokens are the reference's."""
    assert result.token_ids == expected[:len(result.token_ids)]
    if result.finish_reason == "stop":
        assert result.token_ids[-1] == END_OF_TURN
    else:
        assert len(result.token_ids) == len(expected)


PROMPTS = ["Hello world", "The penguin", list(np.random.default_rng(0).integers(13, 1024, 37))]


# ------------------------------------------------------------------------------------------ parity and batching


@pytest.mark.parametrize("penalty", [1.0, 3.0])  # 3.0: the tiny model's greedy text stops repeating one token
def test_greedy_equals_reference(gen, reference, penalty):
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        result = gen.generate(prompt, max_new_tokens=12, repetition_penalty=penalty)
        assert result.prompt_tokens == len(ids)
        assert_matches_reference(result, reference_greedy(reference, ids, 12, penalty))


def test_batch_of_different_lengths_equals_reference_and_each_alone(gen, reference):
    # Five prompts with max_batch 4: two engine batches; lengths differ, so rows decode at different positions.
    prompts = [*PROMPTS, "a", [5, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309]]
    batch = gen.generate(prompts, max_new_tokens=10, repetition_penalty=3.0)
    assert len(batch) == len(prompts)
    for prompt, result in zip(prompts, batch):
        assert_matches_reference(result, reference_greedy(reference, gen.encode(prompt), 10, 3.0))
        alone = gen.generate(prompt, max_new_tokens=10, repetition_penalty=3.0)
        assert (result.token_ids, result.text, result.finish_reason) == (alone.token_ids, alone.text,
                                                                         alone.finish_reason)


def test_sampled_batch_equals_each_alone(gen):
    prompts = ["Hello world", "a", "The penguin"]
    sampling = dict(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=16)
    batch = gen.generate(prompts, **sampling)
    assert [r.token_ids for r in batch] == [gen.generate(p, **sampling).token_ids for p in prompts]


def test_a_batch_steps_only_the_rows_up_to_its_last_live_one(gen):
    """A lone request in a 4-row batch runs one row per step, not four."""
    from serve.batch import Batch

    rows_stepped = []

    class RecordingEngine:  # the real engine, with the row count of every step written down
        spec = gen.engine.spec

        def allocate(self, batch):
            return gen.engine.allocate(batch)

        def step(self, state, input_ids, write_indices, logits_indices):
            rows_stepped.append(len(input_ids))
            return gen.engine.step(state, input_ids, write_indices, logits_indices)

    params = SamplingParams(max_new_tokens=3)
    batch = Batch(RecordingEngine(), 4, gen.pad_token_id)
    alone = gen.new_sequence(gen.tokenizer.encode("Hello").ids, params)
    batch.add(alone)
    while not alone.finished:
        batch.step()
    assert rows_stepped == [1, 1, 1]
    assert alone.token_ids == gen.generate("Hello", max_new_tokens=3).token_ids


def test_prompt_plus_reply_is_clipped_to_max_context(gen):
    prompt = [5] + list(np.random.default_rng(1).integers(13, 1024, 249))  # 250 of max_context 256
    result = gen.generate(prompt, max_new_tokens=100, temperature=1.0, top_k=5, seed=0)
    assert result.finish_reason == "length" and len(result.token_ids) == 6


def test_result_fields(gen):
    result = gen.generate("Hello world", max_new_tokens=5)
    assert result.prompt_tokens == 4 and result.completion_tokens == len(result.token_ids) == 5
    assert result.finish_reason == "length"
    assert result.time_to_first_token_s > 0 and result.decode_tokens_per_s > 0
    assert gen.backend == "onnxruntime-cpu"


# ------------------------------------------------------------------------------------- the sampler, on crafted logits


def draws(logits, n=3000, seed=0, seen=None, **params):
    rng = np.random.default_rng(seed)
    sp = SamplingParams(**params)
    return np.array([sample_token(np.asarray(logits, np.float32), sp, rng, seen) for _ in range(n)])


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


LOGITS = np.random.default_rng(3).normal(0, 2, 64).astype(np.float32)


def test_top_k_never_leaves_the_k_best():
    best = set(np.argsort(-LOGITS)[:5].tolist())
    got = set(draws(LOGITS, temperature=1.5, top_k=5).tolist())
    assert got <= best and len(got) > 1


def test_top_p_never_leaves_the_nucleus():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, temperature=1.0, top_p=0.8).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(draws(logits, temperature=1.0, top_p=0.85).tolist()) == {0, 1, 2}
    probs = token_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.85))
    np.testing.assert_allclose(probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_min_p_drops_tokens_below_its_fraction_of_the_best():
    logits = np.log([0.5, 0.2, 0.12, 0.08, 0.1])
    assert set(draws(logits, temperature=1.0, min_p=0.22).tolist()) == {0, 1, 2}  # p >= 0.22 * 0.5


def test_temperature_moves_entropy_the_expected_way():
    h = [entropy(token_probabilities(LOGITS, SamplingParams(temperature=t))) for t in (0.3, 1.0, 3.0)]
    assert h[0] < h[1] < h[2]
    distinct = [len(set(draws(LOGITS, n=500, temperature=t).tolist())) for t in (0.3, 3.0)]
    assert distinct[0] < distinct[1]
    assert set(draws(LOGITS, n=50, temperature=0).tolist()) == {int(np.argmax(LOGITS))}


def test_repetition_penalty_lowers_repeated_tokens():
    logits = np.array([2.0, -1.0, 1.0, 0.5], np.float32)
    seen = np.array([True, True, False, False])
    plain = token_probabilities(logits, SamplingParams(temperature=1.0))
    penalized = token_probabilities(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), seen)
    assert penalized[0] < plain[0] and penalized[1] < plain[1]  # a positive and a negative logit both drop
    # transformers' arithmetic: 2 / 2 and -1 * 2
    np.testing.assert_allclose(penalized, np.exp([1.0, -2.0, 1.0, 0.5]) / np.exp([1.0, -2.0, 1.0, 0.5]).sum())
    assert (draws(logits, seen=seen, temperature=1.0, repetition_penalty=2.0) == 0).mean() < plain[0] - 0.1


def test_seed_repeats_and_different_seeds_differ(gen):
    a, b, c = (gen.generate("Hello world", temperature=1.0, max_new_tokens=20, seed=s)
               for s in (1, 1, 2))
    assert a.token_ids == b.token_ids != c.token_ids
    assert (draws(LOGITS, n=50, seed=5, temperature=1.0) == draws(LOGITS, n=50, seed=5, temperature=1.0)).all()


def test_defaults_follow_transformers():
    assert defaults_from_generation_config({"eos_token_id": 9}).greedy
    sampled = defaults_from_generation_config({"do_sample": True, "temperature": 0.3, "max_new_tokens": 64})
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.max_new_tokens) == (0.3, 50, 1.0, 64)


# ------------------------------------------------------------------------------------------ stop strings, streaming


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(gen):
    full = gen.generate("The penguin", max_new_tokens=12, repetition_penalty=3.0)
    pieces = [gen.tokenizer.decode([t]) for t in full.token_ids]
    boundary = len(pieces[0]) + len(pieces[1]) + len(pieces[2])  # after the third token
    stop = full.text[boundary - 2:boundary + 2]
    assert len(stop) == 4 and stop not in full.text[:boundary + 1]
    stream = gen.stream("The penguin", max_new_tokens=12, repetition_penalty=3.0, stop=["never there", stop])
    expected, streamed = full.text[:full.text.index(stop)], ""
    for piece in stream:
        streamed += piece
        assert expected.startswith(streamed)  # nothing of the stop string was ever streamed
    result = stream.result
    assert result.finish_reason == "stop" and stop not in result.text
    assert streamed == result.text == expected


def test_a_held_back_stop_prefix_is_released_when_no_stop_follows(gen):
    full = gen.generate("Hello world", max_new_tokens=8)  # " world" eight times
    stream = gen.stream("Hello world", max_new_tokens=8, stop=[" world!"])
    assert "".join(stream) == stream.result.text == full.text
    assert stream.result.finish_reason == "length"


def test_streamed_pieces_concatenate_to_the_result(gen):
    sampling = dict(temperature=0.9, seed=11, max_new_tokens=30)
    stream = gen.stream("Hello world", **sampling)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.result.text
    assert stream.result.token_ids == gen.generate("Hello world", **sampling).token_ids


# ------------------------------------------------------------------------------------------------------ chat


def test_apply_chat_template(gen):
    messages = [{"role": "user", "content": "Hi"}]
    text = gen.apply_chat_template(messages)
    ids = gen.apply_chat_template(messages, tokenize=True)
    assert text.startswith("<BOS_TOKEN>") and ids == gen.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids.count(5) == 1  # one BOS: the template's
    assert gen.chat(messages, max_new_tokens=3).token_ids == gen.generate(ids, max_new_tokens=3).token_ids


def test_chat_parses_tool_calls_and_citations(tiny_artifact):
    tools = [{"name": "search", "description": "Search", "parameter_definitions": {}}]
    messages = [{"role": "user", "content": "Hi"}]
    gen = Generator(tiny_artifact)
    # The tiny checkpoint's tool_use and rag templates render ~900 tokens, past this artifact's 256.
    with pytest.raises(ValueError, match="max_context is 256"):
        gen.chat(messages, tools=tools)
    gen.templates = ChatTemplates({"default": "{{ bos_token }}", "tool_use": "{{ bos_token }}tools",
                                   "rag": "{{ bos_token }}documents"}, gen.templates.special_tokens)
    with_tools = gen.chat(messages, tools=tools, max_new_tokens=4)
    assert with_tools.tool_calls.raw == with_tools.text and with_tools.tool_calls.error  # random weights
    with_docs = gen.chat(messages, documents=[{"title": "t", "text": "x"}], max_new_tokens=4)
    assert with_docs.grounded_answer.raw == with_docs.text and with_docs.tool_calls is None


# ------------------------------------------------------------------------------------------------ refused input


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature -0.1"),
    (dict(top_p=0), r"top_p 0: must lie in \(0, 1\]"),
    (dict(top_p=1.5), "top_p 1.5"),
    (dict(top_k=-1), "top_k -1"),
    (dict(min_p=1.5), r"min_p 1.5: must lie in \[0, 1\]"),
    (dict(repetition_penalty=0), "repetition_penalty 0"),
    (dict(max_new_tokens=0), "max_new_tokens 0"),
    (dict(temperature="hot"), "temperature 'hot': must be a number"),
    (dict(stop_token_ids=[4096]), "stop_token_ids: 4096"),
    (dict(stop=[""]), "stop"),
    (dict(beam_width=2), "unknown sampling parameter 'beam_width'"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[5] * 256), "prompt has 256 tokens; the artifact's max_context is 256"),
    (dict(prompt=[5, 1024]), "token id 1024 is outside the vocabulary"),
    (dict(prompt=3.5), "prompt: expected"),
])
def test_refused_before_any_compute(gen, kwargs, message):
    prompt = kwargs.pop("prompt", "Hello")
    with pytest.raises(ValueError, match=message):
        gen.generate(prompt, **kwargs)
    if not isinstance(prompt, float) and prompt != []:
        with pytest.raises(ValueError, match=message):
            gen.stream(prompt, **kwargs)  # at the call, not at the first piece


def test_chat_errors_name_the_problem(gen):
    with pytest.raises(ValueError, match="role 'robot'"):
        gen.chat([{"role": "robot", "content": "hi"}])


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "tokenizer_config.json").write_text("{}"), "tokenizer_config.json"),
    (lambda folder: (folder / "model.onnx.data").unlink(), "missing"),
])
def test_tampered_artifact_is_refused(tiny_artifact, tmp_path, damage, message):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, folder)
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        Generator(folder)


def test_serve_runs_without_torch(tiny_artifact):
    code = (f"import sys, serve, serve.__main__; serve.Generator({str(tiny_artifact)!r}).generate('hi', "
            "max_new_tokens=2); assert 'torch' not in sys.modules and 'reference' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -------------------------------------------------------------------------------------------------------- CLI


def serve_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_cli_completes_a_prompt(tiny_artifact, gen):
    done = serve_cli(tiny_artifact, "hello", "--max-new-tokens", 6)
    assert done.returncode == 0, done.stderr
    assert done.stdout == gen.generate("hello", max_new_tokens=6).text + "\n" and done.stdout.strip()


def test_cli_chat_reads_lines_until_exit(tiny_artifact, gen):
    sampling = dict(max_new_tokens=4, temperature=0.7, seed=1)
    done = serve_cli(tiny_artifact, "--chat", *[f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()],
                     stdin="hi\n\nhow are you?\n/exit\nnot read\n")
    assert done.returncode == 0, done.stderr
    # The same conversation through the API: the empty line is skipped, each reply joins the history.
    history, expected = [], ""
    for message in ("hi", "how are you?"):
        history.append({"role": "user", "content": message})
        reply = gen.generate(gen.apply_chat_template(history, tokenize=True), **sampling).text
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert done.stdout == expected
    assert serve_cli(tiny_artifact, "--chat", "--max-new-tokens", 2, stdin="hi\n").returncode == 0  # EOF ends


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1", "x"], "temperature -1.0"),
    (["--top-p", "2", "x"], "top_p 2.0"),
    ([], "give a PROMPT to complete, or --chat"),
    (["x", "--chat"], "give a PROMPT to complete, or --chat"),
    (["x", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tiny_artifact, args, message):
    done = serve_cli(tiny_artifact, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr


def test_cli_bad_artifact_exits_2_with_one_line(tmp_path):
    done = serve_cli(tmp_path / "nowhere", "x")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "not a folder" in done.stderr

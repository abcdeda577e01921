"""Serving memory: the ONNX Runtime engine does not keep a long prefill's activations, and ``python -m
bench.serve_memory`` reports what it measures (its figures belong to the machine that runs it: no timing or size
bound is asserted on the tiny model, whose weights are smaller than the interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from bench.serve_memory import CONFIGS, override_session_options, resident_bytes, summarize, with_ratio
from engines import Artifact, open_engine
from engines.onnxruntime import OnnxRuntimeEngine

from .conftest import REPO, export_tiny

LONG_CONTEXT = 4096


@pytest.fixture(scope="module")
def long_tiny_artifact(tmp_path_factory):
    """The tiny model with a context long enough that one prefill's attention scores are large: 4096 x 4096 x 4
    heads x 4 bytes = 268 MB per layer."""
    return export_tiny(tmp_path_factory.mktemp("artifacts") / "tiny-long", "--max-batch", "1", "--max-context",
                       str(LONG_CONTEXT), "--skip-verify", capture_output=True)


def test_a_long_prefill_leaves_no_activations_behind(long_tiny_artifact):
    """ONNX Runtime's CPU arena would keep the largest step's buffers (here at least the 268 MB of attention scores)
    for the life of the session; the engine hands them back when the step ends. Run on the portable graph, whose
    Attention holds every head's scores at once (the GroupQueryAttention variant's peak is lower)."""
    artifact = Artifact.open(long_tiny_artifact)
    engine = OnnxRuntimeEngine(artifact.path(artifact.manifest.graph.onnx_file), artifact.spec, "cpu")
    state = engine.allocate(1)
    prompt = np.arange(LONG_CONTEXT, dtype=np.int64)[None] % engine.spec.vocab_size
    before = resident_bytes()
    engine.step(state, prompt, np.zeros(1, np.int64), np.array([LONG_CONTEXT - 1]))
    after = resident_bytes()
    assert after["VmHWM"] - before["VmRSS"] > 256 * 2**20  # the step did hold its scores
    assert after["VmRSS"] - before["VmRSS"] < 64 * 2**20


def test_ratio_and_bound_are_computed_from_the_run():
    run = {"weight_bytes": 400 * 10**6, "generate_rss_bytes": 700 * 10**6}
    assert with_ratio(run) == run | {"ratio": 1.75, "bound_bytes": 900 * 10**6, "within_bound": True}
    over = with_ratio(run | {"generate_rss_bytes": 900 * 10**6 + 1})
    assert over["ratio"] == (900 * 10**6 + 1) / (400 * 10**6) and not over["within_bound"]


def test_summary_takes_medians_per_configuration_and_prompt():
    def run(config, rss, speed):
        return with_ratio({"config": config, "prompt_tokens": 32, "weight_bytes": 100, "load_rss_bytes": rss,
                           "generate_rss_bytes": rss, "peak_rss_bytes": rss, "decode_tokens_per_s": speed})

    summary = summarize([run("engine", 200, 5.0), run("arena", 900, 1.0), run("engine", 300, 9.0),
                         run("engine", 250, 7.0)])
    engine, arena = summary
    assert engine["config"] == "engine" and engine["repeats"] == 3 and arena["repeats"] == 1
    assert engine["generate_rss_bytes"] == 250 and engine["ratio"] == 2.5 and engine["bound_bytes"] == 150 + 300e6
    assert engine["decode_tokens_per_s"] == {"median": 7.0, "best": 9.0}


def test_configurations_override_the_engines_session_options(tiny_artifact, monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", ort.InferenceSession)  # restored after the test
    override_session_options(CONFIGS["arena"] | CONFIGS["no-prepacking"])
    engine = open_engine(Artifact.open(tiny_artifact), "onnxruntime-cpu")
    assert engine._session_options.enable_cpu_mem_arena
    assert engine._session_options.get_session_config_entry("session.disable_prepacking") == "1"


def test_bench_reports_memory_and_speed_per_configuration(tiny_artifact, tmp_path):
    out = tmp_path / "serve-memory.json"
    done = subprocess.run([sys.executable, "-m", "bench.serve_memory", "--artifact", str(tiny_artifact),
                           "--configs", "engine", "arena", "--prompt-tokens", "4", "--new-tokens", "8",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert json.loads(done.stdout) == results
    weight_bytes = Artifact.open(tiny_artifact).manifest.memory.weight_bytes
    assert [r["config"] for r in results["runs"]] == ["engine", "arena"]
    for run in results["runs"]:
        assert run["weight_bytes"] == weight_bytes and run["generated_tokens"] == 8 and run["prompt_tokens"] == 4
        assert 0 < run["baseline_rss_bytes"] <= run["load_rss_bytes"] <= run["peak_rss_bytes"]
        assert 0 < run["generate_rss_bytes"] <= run["peak_rss_bytes"]
        assert run["ratio"] == run["generate_rss_bytes"] / weight_bytes
        assert run["decode_tokens_per_s"] > 0
    assert [(s["config"], s["repeats"]) for s in results["summary"]] == [("engine", 1), ("arena", 1)]

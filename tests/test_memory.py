"""The memory plan against an independent count: the reference model built on the meta device, its parameters and
its static caches summed, for the real presets at 8192 tokens on an 80 GB GPU."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

from engines import Artifact
from engines.memory import DTYPE_BYTES, MemoryPlan
from reference import PRESETS, CohereForCausalLM
from tests.conftest import REPO

GPU_80GB = 80 * 10**9


def independent_counts(config, dtype: str) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of the reference model itself, without materialising anything."""
    with torch.device("meta"):
        model = CohereForCausalLM(config).to(getattr(torch, dtype))
        caches = model.new_caches(1, 1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = sum(t.numel() * t.element_size() for pair in caches for t in pair)
    return weights, per_token


@pytest.mark.parametrize("preset", ["command-r", "command-r-plus", "aya-23-8b", "tiny"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_plan_counts_what_the_model_holds(preset, dtype):
    config = PRESETS[preset].config
    plan = MemoryPlan.for_config(config.to_dict(), dtype, max_batch=8, max_context=8192, device="cuda",
                                 budget_bytes=GPU_80GB)
    weights, per_token = independent_counts(config, dtype)
    assert plan.weight_bytes == weights
    assert plan.kv_bytes_per_token == per_token
    assert plan.kv_bytes_per_row == per_token * 8192
    print(f"\n{plan.table()}")


def test_command_r_figures_the_issue_quotes():
    """35B parameters (70 GB in fp16) and 1.3 MB of KV cache per token: 86 GB for 8 rows of 8192 tokens."""
    plan = MemoryPlan.for_config(PRESETS["command-r"].config.to_dict(), "float16", max_batch=8, max_context=8192,
                                 device="cuda", budget_bytes=GPU_80GB)
    assert 34.9e9 < plan.weight_bytes / DTYPE_BYTES["float16"] < 35.1e9
    assert plan.kv_bytes_per_token == 2 * 40 * 64 * 128 * 2  # keys and values, layers, kv heads, head_dim, fp16
    assert 85e9 < 8 * plan.kv_bytes_per_row < 87e9
    # 70 GB of weights leave room for less than one row of 8192 tokens (10.7 GB): the refusal says what fits.
    assert not plan.fits and plan.largest_batch() == 0
    context = plan.largest_context()
    assert f"not one row of 8192 tokens; --max-context {context} at this --max-batch" in plan.refusal()
    assert MemoryPlan.for_config(PRESETS["command-r"].config.to_dict(), "float16", 8, context, "cuda",
                                 GPU_80GB).fits


# The presets' shapes as their model cards publish them: hidden, intermediate, layers, heads, kv heads, vocab,
# qk-norm. All three tie the LM head to the embedding.
PUBLISHED_SHAPES = {
    "command-r": (8192, 22528, 40, 64, 64, 256000, False),
    "command-r-plus": (12288, 33792, 64, 96, 8, 256000, True),
    "aya-23-8b": (4096, 14336, 32, 32, 8, 256000, False),
}


def readme_plan_rows() -> dict[str, list[str]]:
    """The README's plan table: the preset name (first word of the first cell) -> the other cells."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].split(" ")[0] in PUBLISHED_SHAPES:
            rows[cells[0].split(" ")[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("preset", sorted(PUBLISHED_SHAPES))
def test_readme_plan_for_the_presets_is_the_arithmetic_by_hand(preset):
    """fp16, 8 rows of 8192 tokens on an 80 GB GPU: every figure worked out from the published shapes, against
    the plan and the README's table."""
    hidden, inter, layers, heads, kv_heads, vocab, qk_norm = PUBLISHED_SHAPES[preset]
    head_dim = hidden // heads
    per_layer = (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q and o; k and v
                 + 3 * hidden * inter + hidden + qk_norm * (heads + kv_heads) * head_dim)  # MLP; norm; qk-norm
    weights = 2 * (vocab * hidden + layers * per_layer + hidden)  # fp16; the final norm
    per_token = 2 * layers * kv_heads * head_dim * 2  # keys and values, fp16
    activations = 512 * (4 * hidden + 2 * inter) * 2 + 4 * vocab  # a 512-token prefill chunk, fp32 logits
    runtime = 2 * 2**30
    total = weights + runtime + 8 * (8192 * per_token + activations)
    room = GPU_80GB - weights - runtime
    most_rows = max(0, room // (8192 * per_token + activations))
    longest = max(0, (room // 8 - activations) // per_token)

    plan = MemoryPlan.for_config(PRESETS[preset].config.to_dict(), "float16", max_batch=8, max_context=8192,
                                 device="cuda", budget_bytes=GPU_80GB)
    assert (plan.weight_bytes, plan.kv_bytes_per_token, plan.total_bytes()) == (weights, per_token, total)
    assert (plan.fits, plan.largest_batch(), plan.largest_context()) == (total <= GPU_80GB, most_rows, longest)
    weights_cell, token_cell, row_cell, total_cell, fits_cell, rows_cell, context_cell = readme_plan_rows()[preset]
    assert weights_cell == f"{weights / 1e9:.1f} GB" and token_cell == f"{per_token / 1e6:.2f} MB"
    assert row_cell == f"{8192 * per_token / 1e9:.1f} GB" and total_cell == f"{total / 1e9:.1f} GB"
    assert fits_cell.startswith("yes" if total <= GPU_80GB else "no")
    assert (rows_cell, context_cell) == (str(most_rows), str(longest))


def test_weights_that_do_not_fit_are_named():
    plan = MemoryPlan.for_config(PRESETS["command-r-plus"].config.to_dict(), "float16", 1, 8192, "cuda", GPU_80GB)
    assert not plan.fits and "the weights alone (" in plan.refusal()


def test_refusal_names_what_would_fit():
    config = PRESETS["aya-23-8b"].config.to_dict()  # 8B: 16 GB of fp16 weights, 0.13 MB of KV cache per token
    plan = MemoryPlan.for_config(config, "float16", max_batch=64, max_context=8192, device="cuda",
                                 budget_bytes=GPU_80GB)
    assert not plan.fits
    batch, context = plan.largest_batch(), plan.largest_context()
    assert 0 < batch < 64 and 0 < context < 8192
    assert f"--max-batch {batch} at this --max-context" in plan.refusal()
    assert f"--max-context {context} at this --max-batch" in plan.refusal()
    # What it names fits, and one more does not.
    fitting = MemoryPlan.for_config(config, "float16", batch, 8192, "cuda", GPU_80GB)
    assert fitting.fits and not MemoryPlan.for_config(config, "float16", batch + 1, 8192, "cuda", GPU_80GB).fits
    assert MemoryPlan.for_config(config, "float16", 64, context, "cuda", GPU_80GB).fits
    assert not MemoryPlan.for_config(config, "float16", 64, context + 1, "cuda", GPU_80GB).fits


def test_unknown_budget_is_not_checked():
    plan = MemoryPlan.for_config(PRESETS["command-r-plus"].config.to_dict(), "float16", 8, 8192, "cuda", None)
    assert plan.fits and plan.refusal() is None and "budget unknown" in plan.table()


# ------------------------------------------------------------------------------ export and serve check the plan


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_an_impossible_plan_is_refused_before_any_work(tmp_path):
    out = tmp_path / "art"
    started = time.perf_counter()
    done = run_export("--model", "tiny", "--out", out, "--max-batch", 4096, "--max-context", 4096,
                      "--memory-budget", "700MB")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "would not fit where it runs: max_batch 4096 x max_context 4096 needs" in done.stderr
    match = re.search(r"What fits: --max-batch (\d+) at this --max-context, or --max-context (\d+) at this "
                      r"--max-batch", done.stderr)
    assert match, done.stderr
    assert time.perf_counter() - started < 60  # no model was loaded or traced
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # What it names does fit.
    fitting = run_export("--model", "tiny", "--out", out, "--max-batch", match.group(1), "--max-context", 4096,
                         "--memory-budget", "700MB", "--skip-verify", "--engine", "onnx")
    assert fitting.returncode == 0, fitting.stderr


def test_max_batch_auto_takes_the_largest_batch_that_fits(tmp_path):
    done = run_export("--model", "tiny", "--out", tmp_path / "art", "--max-batch", "auto", "--max-context", 4096,
                      "--memory-budget", "700MB", "--skip-verify", "--engine", "onnx")
    assert done.returncode == 0, done.stderr
    manifest = Artifact.open(tmp_path / "art").manifest
    plan = MemoryPlan.for_config(PRESETS["tiny"].config.to_dict(), "float32", 1, 4096, "cpu", 700 * 10**6)
    assert manifest.graph.spec.max_batch == manifest.memory.max_batch == plan.largest_batch() > 1
    assert manifest.memory.fits and manifest.memory.budget_bytes == 700 * 10**6
    assert "memory plan on cpu (float32), budget 0.65 GiB" in done.stdout


def test_max_batch_auto_needs_a_known_budget(tmp_path, monkeypatch):
    from export.build import ExportError, ExportOptions, memory_plan

    monkeypatch.setattr("export.build.default_budget", lambda device: None)  # a device whose free memory is unknown
    with pytest.raises(ExportError, match="--max-batch auto: the free memory of cpu cannot be told here; pass "
                                          "--memory-budget"):
        memory_plan(PRESETS["tiny"].config, ExportOptions(model="tiny", max_batch=None))


def test_serve_checks_the_plan_where_it_runs(tiny_artifact, monkeypatch):
    """A machine with less free memory than the artifact's KV cache needs is told so on load, with what fits."""
    from engines import ArtifactError
    from serve import Generator

    Generator(tiny_artifact)  # fits here
    monkeypatch.setattr("engines.memory.free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ArtifactError, match="does not fit on cpu now: .*Re-export with those flags"):
        Generator(tiny_artifact)

"""The memory plan against an independent count: the reference model built on the meta device, its parameters and
its static caches summed, for the real presets at 8192 tokens on an 80 GB GPU."""

from __future__ import annotations

import pytest
import torch

from engines.memory import DTYPE_BYTES, MemoryPlan
from reference import PRESETS, CohereForCausalLM

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

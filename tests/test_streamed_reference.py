"""The streamed fp32 reference (weights read from the checkpoint module by module) computes exactly what the
in-memory fp32 reference computes, while holding at most one layer's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import Artifact
from engines.greedy import teacher_forced
from export import parity
from export.reference_engine import ReferenceEngine, StreamedReferenceEngine
from reference import CohereConfig, load_checkpoint, resolve_checkpoint
from reference.weights import config_dims, expected_tensors

from .conftest import CONFIGS, save_hf_checkpoint


@pytest.fixture(scope="module", params=["tiny", "gqa-untied"])
def checkpoint(request, tmp_path_factory):
    if request.param == "tiny":
        return resolve_checkpoint("tiny")
    return save_hf_checkpoint(tmp_path_factory.mktemp("gqa-untied"), **CONFIGS["gqa-untied"])


@pytest.mark.parametrize("lm_head_rows", [8192, 7])  # the whole vocabulary at once, and uneven chunks of it
def test_streamed_reference_equals_the_loaded_reference(checkpoint, lm_head_rows):
    """Bit for bit, except that a vocabulary split in chunks may let BLAS pick another kernel for a chunk's
    matrix product, whose sum of the same products rounds differently in the last bit."""
    model, config = load_checkpoint(checkpoint, torch.float32)
    loaded = ReferenceEngine(model, max_batch=3, max_context=32)
    streamed = StreamedReferenceEngine(checkpoint, config, max_batch=3, max_context=32, lm_head_rows=lm_head_rows)
    prompts, decode_steps, continuation = parity.scenario(config.vocab_size, 3, 32)
    steps = 0
    for step in teacher_forced([loaded, streamed], prompts, decode_steps, continuation):
        expected, got = step.logits
        if lm_head_rows >= len(expected[0]):
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
        for (k, v), (rk, rv) in zip(streamed.read_cache(step.states[1]), loaded.read_cache(step.states[0])):
            np.testing.assert_array_equal(k, rk)
            np.testing.assert_array_equal(v, rv)
        steps += 1
    assert steps == decode_steps + 1 + (continuation > 0)
    assert parity.greedy(streamed, prompts, decode_steps) == parity.greedy(loaded, prompts, decode_steps)


def test_streamed_reference_holds_one_layer_at_a_time(checkpoint):
    config = CohereConfig.from_json_file(checkpoint / "config.json")
    streamed = StreamedReferenceEngine(checkpoint, config, max_batch=1, max_context=16, lm_head_rows=4)
    parity.greedy(streamed, [[1, 2, 3]], 2)
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing kept between steps
    assert streamed.largest_resident_bytes == max(layer_bytes(config), 4 * config.hidden_size * 4)


def test_export_records_what_the_reference_held(tiny_artifact):
    report = Artifact.open(tiny_artifact).manifest.parity.reports["onnxruntime-cpu"]
    config = CohereConfig.from_json_file(tiny_artifact / "config.json")
    lm_head_chunk_bytes = min(8192, config.vocab_size) * config.hidden_size * 4
    assert report["reference"] == {"mode": "streamed",
                                   "largest_resident_bytes": max(layer_bytes(config), lm_head_chunk_bytes)}


def layer_bytes(config: CohereConfig) -> int:
    """One decoder layer's fp32 bytes, from the checkpoint's expected shapes."""
    dims = config_dims(config)
    return sum(4 * int(np.prod([dims[d] for d in shape])) for name, shape in expected_tensors(config).items()
               if name.startswith("model.layers.0."))


def test_verification_sizes_the_reference_cache_to_what_it_uses(tmp_path, monkeypatch):
    """The reference's fp32 cache is allocated whole: sized like the artifact it would be 2.6 MB per token per row
    at Command-R's size. Verification uses at most 4 rows and 256 slots, so that is all it allocates."""
    from export import build as build_module
    from export.build import ExportOptions, build

    sizes = []

    class Recording(build_module.StreamedReferenceEngine):
        def __init__(self, folder, config, max_batch, max_context, **kw):
            sizes.append((max_batch, max_context))
            super().__init__(folder, config, max_batch, max_context, **kw)

    monkeypatch.setattr(build_module, "StreamedReferenceEngine", Recording)
    build(ExportOptions(model="tiny", out=tmp_path / "art", engine="onnx", max_batch=8, max_context=1024))
    assert sizes == [(4, 256)]

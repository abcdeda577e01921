"""ONNX Runtime CPU's GroupQueryAttention variant of the exported graph (export/gqa_graph.py): what it holds, that
the CPU engine runs it, and that it computes what the portable graph and the reference compute."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from engines import Artifact, ArtifactError, open_engine
from engines.onnxruntime import OnnxRuntimeEngine
from export.gqa_graph import GQA_ONNX_FILE, GraphFormError, rewrite
from export.onnx_graph import DATA_FILE, ONNX_FILE
from export.reference_engine import ReferenceEngine
from reference import load_model


def op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def test_the_variant_replaces_each_layers_cache_update_and_attention_and_shares_the_weights(tiny_artifact):
    manifest = Artifact.open(tiny_artifact).manifest
    layers = manifest.graph.spec.num_layers
    assert manifest.graph.onnxruntime_cpu_file == GQA_ONNX_FILE and GQA_ONNX_FILE in manifest.files
    portable, variant = op_counts(tiny_artifact / ONNX_FILE), op_counts(tiny_artifact / GQA_ONNX_FILE)
    assert portable["Attention"] == layers and portable["TensorScatter"] == 2 * layers
    assert variant["GroupQueryAttention"] == layers
    assert not {"Attention", "TensorScatter", "Slice", "LessOrEqual"} & set(variant)  # nor the mask's arithmetic
    assert {op: n for op, n in portable.items() if op in ("MatMul", "RotaryEmbedding", "LayerNormalization")} == {
        op: n for op, n in variant.items() if op in ("MatMul", "RotaryEmbedding", "LayerNormalization")}

    model = onnx.load(str(tiny_artifact / GQA_ONNX_FILE), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    assert locations == {DATA_FILE}  # every weight is read from the portable graph's data file: one copy
    io = onnx.load(str(tiny_artifact / ONNX_FILE), load_external_data=False).graph
    assert [v.name for v in model.graph.input] == [v.name for v in io.input]
    assert [v.name for v in model.graph.output] == [v.name for v in io.output]


def test_the_cpu_engine_runs_the_variant(tiny_artifact):
    with open_engine(Artifact.open(tiny_artifact), "onnxruntime-cpu") as engine:
        assert engine.onnx_path.name == GQA_ONNX_FILE and engine.group_query_attention


def test_an_artifact_without_the_variant_runs_the_portable_graph(tiny_artifact, tmp_path):
    """Artifacts written before the variant existed, and a manifest that names none, still open."""
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["graph"]["onnxruntime_cpu_file"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with open_engine(Artifact.open(copy), "onnxruntime-cpu") as engine:
        assert engine.onnx_path.name == ONNX_FILE and not engine.group_query_attention


def test_a_variant_the_files_section_does_not_list_is_refused(tiny_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["files"][GQA_ONNX_FILE]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="graph.onnxruntime_cpu_file names 'model.gqa.onnx', which the files"):
        Artifact.open(copy)


def ragged_steps(vocab: int):
    """Every kind of step the serving loop makes: a ragged prefill, decode at different positions, a multi-row
    continuation over non-empty caches (chunked prefill, a prompt after a cached prefix), a step over fewer rows
    than the state holds, a continuation of rows further down the state, and a one-row continuation."""
    rng = np.random.default_rng(3)
    ids = lambda rows, seq: rng.integers(0, vocab, (rows, seq))  # noqa: E731
    return [
        (ids(3, 9), [0, 0, 0], [8, 4, 0], 0),
        (ids(3, 1), [9, 5, 1], [0, 0, 0], 0),
        (ids(3, 5), [10, 6, 2], [4, 2, 0], 0),  # rows at different positions, right-padded
        (ids(2, 1), [15, 9], [0, 0], 0),  # the first two rows only
        (ids(2, 3), [10, 3], [2, 1], 1),  # rows 1 and 2
        (ids(1, 7), [16], [6], 0),
    ]


def test_the_variant_computes_what_the_portable_graph_and_the_reference_compute(tiny_artifact):
    spec = Artifact.open(tiny_artifact).spec
    model, _ = load_model("tiny")
    engines = [ReferenceEngine(model, spec.max_batch, spec.max_context),
               OnnxRuntimeEngine(tiny_artifact / ONNX_FILE, spec, "cpu"),
               OnnxRuntimeEngine(tiny_artifact / GQA_ONNX_FILE, spec, "cpu", group_query_attention=True)]
    states = [engine.allocate(3) for engine in engines]
    for input_ids, write_indices, logits_indices, first_row in ragged_steps(spec.vocab_size):
        with torch.no_grad():
            reference, portable, variant = (engine.step(state, input_ids, np.array(write_indices),
                                                        np.array(logits_indices), first_row)
                                            for engine, state in zip(engines, states))
        assert np.abs(variant - reference).max() <= 1e-4
        assert np.abs(variant - portable).max() <= 1e-5
    filled = [23, 13, 5]  # slots holding real tokens of each row after the steps
    for (rk, rv), (k, v) in zip(engines[0].read_cache(states[0]), engines[2].read_cache(states[2])):
        for row, n in enumerate(filled):
            assert np.abs(k[row, :, :n] - rk[row, :, :n]).max() <= 1e-4
            assert np.abs(v[row, :, :n] - rv[row, :, :n]).max() <= 1e-4
            assert not k[row, :, max(filled) + 7:].any()  # nothing written past where a step wrote


def test_a_graph_of_another_form_is_refused_by_name(tiny_artifact):
    model = onnx.load(str(tiny_artifact / GQA_ONNX_FILE), load_external_data=False)
    with pytest.raises(GraphFormError, match="no Attention node"):
        rewrite(model, 4, 2, 16)

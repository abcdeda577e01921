"""The export streams: the graph is traced on fake tensors and each weight is written from where it is stored, block
by block. The result must be the graph torch's exporter makes of the in-memory model with its optimiser on (the
export before streaming), and the export's memory must not grow with the weights."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxscript import ir

from bench.export_memory import SIZES, measure, write_checkpoint
from engines.base import GraphSpec
from export import weights_writer
from export.onnx_graph import (DATA_FILE, ONNX_FILE, DecoderStep, example_inputs, export_arguments, export_graph,
                               export_onnx)
from export.weights_writer import CheckpointWeights, StateDictWeights, WeightTensor
from reference import CheckpointError, CohereConfig, load_checkpoint
from reference.checkpoint import tiny_model
from reference.presets import PRESETS
from tests.conftest import REPO

TINY = PRESETS["tiny"].config


def _spec(config: CohereConfig, dtype: str) -> GraphSpec:
    return GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=4, max_context=64, dtype=dtype)


def _in_memory_export(model, spec: GraphSpec, folder):
    """The export as it was before streaming: torch's exporter on the in-memory model, with its optimiser."""
    folder.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(DecoderStep(model), example_inputs(spec), **export_arguments(spec),
                                    optimize=True)
    ir.save(program.model, folder / ONNX_FILE, external_data=DATA_FILE)
    return folder / ONNX_FILE


def _graph(path) -> dict:
    """A graph as comparable parts: nodes in order with initializer inputs replaced by their values, the
    initializers' values (any order, any name), value infos, inputs, outputs."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def value(name):
        array = values[name]
        return str(array.dtype), array.shape, array.tobytes()

    return dict(
        nodes=[(n.op_type, [value(i) if i in values else i for i in n.input], list(n.output),
                [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute]) for n in model.graph.node],
        initializers=Counter(value(name) for name in values),
        value_info=sorted(v.SerializeToString() for v in model.graph.value_info),
        inputs=list(model.graph.input), outputs=list(model.graph.output), opset=list(model.opset_import))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 KiB, so that every weight of these small models is written in several pieces (and transposed
    weights in several column bands), as the weights of a large model are."""
    monkeypatch.setattr(weights_writer, "BLOCK_BYTES", 4096)


@pytest.mark.parametrize("tied, dtype", [(True, "float16"), (False, "float32")])
def test_streamed_export_of_a_model_equals_the_in_memory_optimised_export(tmp_path, small_blocks, tied, dtype):
    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    model = tiny_model(config).to(getattr(torch, dtype))
    spec = _spec(config, dtype)
    expected = _graph(_in_memory_export(model, spec, tmp_path / "in-memory"))
    (tmp_path / "streamed").mkdir()
    streamed = _graph(export_onnx(model, spec, tmp_path / "streamed"))
    assert streamed == expected
    ops = Counter(op for op, *_ in streamed["nodes"])
    # what the optimiser folded must stay folded: no weight Transpose, no rotary table computation
    assert ops["Transpose"] == 4 * config.num_hidden_layers and not ops.keys() & {"Cos", "Sin", "Pow", "Constant"}


def test_streamed_export_of_a_sharded_bf16_checkpoint_equals_the_in_memory_export(tmp_path, small_blocks):
    """Shards, and a stored dtype other than the target: each tensor is converted as the reference loader converts
    it (the in-memory export is of the model that loader builds)."""
    config = dataclasses.replace(TINY, tie_word_embeddings=False)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    write_checkpoint(folder, config, dtype=torch.bfloat16, shard_bytes=200_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 3
    spec = _spec(config, "float16")
    model, _ = load_checkpoint(folder, torch.float16)
    expected = _graph(_in_memory_export(model, spec, tmp_path / "in-memory"))
    (tmp_path / "streamed").mkdir()
    assert _graph(export_graph(config, CheckpointWeights(folder, config), spec, tmp_path / "streamed")) == expected


def test_large_tensors_are_aligned_in_the_data_file(tmp_path):
    """Tensors over 1 MiB start at 64 KiB offsets (ONNX Runtime can map them in place); the graph reads the same."""
    config = dataclasses.replace(TINY, vocab_size=4096, hidden_size=256, intermediate_size=1280)
    model = tiny_model(config)
    path = export_onnx(model, _spec(config, "float32"), tmp_path)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}.get("offset", 0))
               for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.external_data}
    assert offsets["model.model.embed_tokens.weight"] % 65536 == 0  # 4 MiB
    embedding = next(t for t in onnx.load(str(path)).graph.initializer if t.name == "model.model.embed_tokens.weight")
    np.testing.assert_array_equal(numpy_helper.to_array(embedding), model.model.embed_tokens.weight.detach().numpy())


def test_a_large_weight_is_never_read_whole():
    weight = WeightTensor(StateDictWeights({"w": torch.ones(100, 100)}), "w", torch.float16)
    with pytest.raises(RuntimeError, match="w .10000 values. was read whole"):
        weight.numpy()
    small = WeightTensor(StateDictWeights({"w": torch.arange(6.0).reshape(2, 3)}), "w", torch.float16, transpose=True)
    np.testing.assert_array_equal(small.numpy(), np.arange(6.0, dtype=np.float16).reshape(2, 3).T)


def test_an_unreadable_shard_is_refused_by_name(tmp_path):
    write_checkpoint(tmp_path, TINY)
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:4])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file"):
        CheckpointWeights(tmp_path, TINY)


def test_export_memory_does_not_grow_with_the_weights(tmp_path):
    """A 0.4 GB fp32 checkpoint exports in about the memory of a 20 MB one with the same graph (layers, heads): the
    export holds one block of weights, never the model (before streaming it held the model and more)."""
    large = dataclasses.replace(SIZES["0.1b"], vocab_size=32768, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    small = dataclasses.replace(large, vocab_size=2048, hidden_size=256, intermediate_size=1024)
    peaks, weight_bytes = {}, {}
    for name, config in (("small", small), ("large", large)):
        folder = tmp_path / name
        folder.mkdir()
        write_checkpoint(folder, config, dtype=torch.float32)
        weight_bytes[name] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        args = ["--model", str(folder), "--out", str(tmp_path / f"{name}-artifact"), "--dtype", "float32",
                "--engine", "onnx", "--max-batch", "1", "--max-context", "64", "--skip-verify"]
        peaks[name] = measure("export", args, REPO)["peak_rss_bytes"]
    assert weight_bytes["large"] > 350e6
    grown = peaks["large"] - peaks["small"]
    assert grown < 0.25 * (weight_bytes["large"] - weight_bytes["small"]), (peaks, weight_bytes)

"""Weight-only int8/int4 artifacts: the numbers (reference/quantize.py), the graph form both runtimes take, the
export that streams and verifies them, serving them, and the TensorRT-RTX gate keeping the weights quantized.

The quality half of parity (KL, top-1, perplexity against the unquantized model) is tested in test_quality.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from engines import Artifact, open_engine
from engines.base import GraphSpec
from engines.greedy import greedy, teacher_forced
from engines.memory import quantized_weight_bytes
from engines.onnxruntime import OnnxRuntimeEngine
from export.onnx_graph import export_onnx
from export.reference_engine import ReferenceEngine
from reference import CohereConfig, load_model
from reference.checkpoint import tiny_model
from reference.quantize import WeightQuantization, pack_int4, quantized_linear_weights, round_trip_model
from serve import Generator
from tests.test_export import exportable_checkpoint, run_export
from tests.test_tensorrt import needs_builder


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_artifact(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / f"tiny-{request.param}"
    result = run_export("--model", "tiny", "--quantize", request.param, "--out", str(out), "--engine", "onnx",
                        "--max-batch", "4", "--max-context", "256")
    assert result.returncode == 0, result.stderr
    return out


def _spec(config: CohereConfig, dtype: str = "float32", max_batch: int = 2, max_context: int = 32) -> GraphSpec:
    return GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=max_batch,
                     max_context=max_context, dtype=dtype)


# ------------------------------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("bits, block, rows", [(8, 128, 256), (4, 32, 96), (4, 128, 176), (4, 64, 1)])
def test_quantize_rounds_each_block_to_its_own_scale(bits, block, rows):
    w = torch.randn(rows, 40, generator=torch.Generator().manual_seed(0))
    w[:min(rows, block), 3] = 0  # a block of zeros still gets a positive scale (TensorRT requires it)
    q8 = WeightQuantization(bits, block)
    q, scale = q8.quantize(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (-(-rows // block), 40)
    assert (scale > 0).all() and q.abs().max() <= q8.qmax
    for b in range(scale.shape[0]):  # each block's scale from its own largest value, by hand
        block_rows = w[b * block:(b + 1) * block]
        torch.testing.assert_close(scale[b], block_rows.abs().amax(0) / q8.qmax, atol=torch.finfo().tiny, rtol=0)
    error = (q8.dequantize(q, scale) - w).abs()
    assert (error <= scale.repeat_interleave(block, 0)[:rows] / 2 + 1e-7).all()  # round to nearest


def test_a_band_of_whole_blocks_quantizes_as_the_whole_weight():
    """The export quantizes a weight a band of blocks at a time: the result must not depend on the bands."""
    w = torch.randn(200, 24, generator=torch.Generator().manual_seed(1))
    quantization = WeightQuantization(4, 32)
    whole_q, whole_scale = quantization.quantize(w, torch.float16)
    parts = [quantization.quantize(w[start:start + 64], torch.float16) for start in range(0, 200, 64)]
    assert torch.equal(torch.cat([q for q, _ in parts]), whole_q)
    assert torch.equal(torch.cat([s for _, s in parts]), whole_scale)


def test_int4_packing_is_what_onnx_reads():
    values = torch.tensor([[-7, 3, 0], [7, -1, -8], [5, 2, 1]], dtype=torch.int8)  # odd count: padded
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, values.shape, pack_int4(values).numpy().tobytes(),
                                     raw=True)
    assert numpy_helper.to_array(tensor).astype(np.int8).tolist() == values.tolist()


def test_round_trip_model_gives_a_tied_model_its_own_quantized_head():
    model, config = load_model("tiny")
    embedding = model.model.embed_tokens.weight.clone()
    quantization = WeightQuantization(4, 32)
    round_trip_model(model, quantization, torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the lookup keeps the float table
    torch.testing.assert_close(model.lm_head.weight, quantization.round_trip(embedding, torch.float32), rtol=0, atol=0)
    assert not torch.equal(model.lm_head.weight, embedding)


# ------------------------------------------------------------------------------------------- the graph and export


def test_quantized_export_verifies_and_says_what_it_did(quantized_artifact, tiny_artifact):
    artifact = Artifact.open(quantized_artifact)
    manifest = artifact.manifest
    section = manifest.quantization
    bits = 8 if quantized_artifact.name.endswith("int8") else 4
    assert (section.bits, section.block_size, section.method) == (bits, 128 if bits == 8 else 32, "rtn")
    assert section.onnxruntime_accuracy_level == 4 and section.scale_dtype == "float32"
    assert section.weights == [*quantized_linear_weights(manifest.config["num_hidden_layers"]), "lm_head"]
    report = manifest.parity.reports["onnxruntime-cpu"]
    assert report["passed"] and report["rows"][0]["tolerance"].startswith("max_abs <=")
    quality = report["quality"]  # against the unquantized reference, on held-out text
    assert quality["passed"] and quality["bits"] == bits and quality["scored_positions"] > 0
    # The weights file shrinks as the arithmetic of engines.memory says (the tied embedding table stays fp32).
    data = manifest.files["model.onnx.data"].bytes
    expected = quantized_weight_bytes(manifest.config, "float32", bits, section.block_size)
    assert abs(data - expected) / expected < 0.05
    assert data < Artifact.open(tiny_artifact).manifest.files["model.onnx.data"].bytes * (0.7 if bits == 8 else 0.5)
    assert manifest.memory.weight_bytes == expected


def test_quantized_graph_has_one_dequantize_per_projection_and_onnxruntime_fuses_them(quantized_artifact,
                                                                                     tmp_path):
    model = onnx.load(quantized_artifact / "model.onnx", load_external_data=False)
    layers = json.loads((quantized_artifact / "config.json").read_text())["num_hidden_layers"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer; the LM head
    initializers = {i.name: i for i in model.graph.initializer}
    bits = 8 if quantized_artifact.name.endswith("int8") else 4
    for node in dequantize:
        weight = initializers[node.input[0]]
        assert weight.data_type == (onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4)
        assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": 128 if bits == 8 else 32}
    config = json.loads((quantized_artifact / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    projection_shapes = {(hidden, config["num_attention_heads"] * head_dim), (hidden, inter), (inter, hidden),
                         (hidden, config["num_key_value_heads"] * head_dim), (hidden, vocab)}
    float_projections = [i.name for i in model.graph.initializer if tuple(i.dims) in projection_shapes
                         and i.data_type == onnx.TensorProto.FLOAT]
    assert float_projections == []  # no projection kept in float beside its quantized copy

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(quantized_artifact / "model.onnx"), options)
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 7 * layers + 1 and ops["DequantizeLinear"] == 0


@pytest.mark.parametrize("bits, block", [(4, 128), (8, 64)])
def test_blocks_that_do_not_divide_the_inputs_are_exact(tmp_path, bits, block):
    """Hidden 96 and intermediate 176 leave a short last block (ONNX's blocked DequantizeLinear allows it): at
    accuracy level 1 the engine equals the reference running the same dequantized weights."""
    config = CohereConfig(vocab_size=300, hidden_size=96, intermediate_size=176, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0, logit_scale=0.0625,
                          bos_token_id=5, eos_token_id=9, pad_token_id=0)
    model = tiny_model(config)
    quantization = WeightQuantization(bits, block)
    spec = _spec(config)
    export_onnx(model, spec, tmp_path, quantization)
    round_trip_model(model, quantization, torch.float32)
    with OnnxRuntimeEngine(tmp_path / "model.onnx", spec, matmul_nbits_accuracy_level=1) as engine:
        errors = [np.abs(np.subtract(*step.logits)).max()
                  for step in teacher_forced([ReferenceEngine(model, 2, 32), engine], [[1, 2, 3, 4], [5, 6]], 4)]
    assert max(errors) < 1e-4


def test_a_broken_quantization_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """Scales written 2x too large (the reference's round trip unchanged): export must fail its verification."""
    from export import weights_writer
    from export.build import ExportError, ExportOptions, build

    blocks = weights_writer.QuantizedWeight.blocks

    def doubled_scales(self):
        for piece in blocks(self):
            yield piece * 2 if self.scales else piece

    monkeypatch.setattr(weights_writer.QuantizedWeight, "blocks", doubled_scales)
    with pytest.raises(ExportError, match="failed"):
        build(ExportOptions(model="tiny", out=tmp_path / "broken", quantize="int4", engine="onnx", max_batch=2,
                            max_context=64))
    assert not list(tmp_path.iterdir())


def test_quantize_flags_are_checked_before_any_work(tmp_path):
    result = run_export("--block-size", "32", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "--block-size 32: applies only with --quantize" in result.stderr
    result = run_export("--quantize", "int3", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "--quantize" in result.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------- serving


def test_generator_serves_a_quantized_artifact_as_its_engine_computes(quantized_artifact):
    generator = Generator(quantized_artifact, prefix_cache_mb=0)
    prompt = generator.tokenizer.encode("Hello, world").ids
    result = generator.generate(prompt, max_new_tokens=8, temperature=0)
    with open_engine(Artifact.open(quantized_artifact), "onnxruntime") as engine:
        assert result.token_ids == greedy(engine, [prompt], 8)[0][:len(result.token_ids)]


# --------------------------------------------------------------------------------------------- the TensorRT gate


@needs_builder
def test_tensorrt_rtx_builds_quantized_graphs_with_the_weights_kept_quantized(tmp_path):
    """The plan of an int8/int4 graph is smaller than the fp16 one by most of what its weights file saves: had the
    builder dequantized the weights at build time, the plans would be as large. Attention, RoPE and the cache
    update stay native layers."""
    from engines.tensorrt_build import build_plan

    config = CohereConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, rope_theta=10_000.0, logit_scale=0.0625,
                          bos_token_id=5, eos_token_id=9, pad_token_id=0)
    model = tiny_model(config).half()
    spec = _spec(config, "float16", max_batch=2, max_context=64)
    built = {}
    modes = [("fp16", None), ("int8", WeightQuantization(8, 128)), ("int4", WeightQuantization(4, 32))]
    for name, quantization in modes:
        folder = tmp_path / name
        folder.mkdir()
        export_onnx(model, spec, folder, quantization)
        plan = build_plan(folder / "model.onnx", spec, folder)
        built[name] = ((folder / "model.onnx.data").stat().st_size, (folder / plan.plan_file).stat().st_size,
                       plan.native_layers)
    data_fp16, plan_fp16, native_fp16 = built["fp16"]
    for name in ("int8", "int4"):
        data, plan, native = built[name]
        assert plan_fp16 - plan >= 0.5 * (data_fp16 - data), f"{name}: plan {plan} B against fp16 {plan_fp16} B"
        assert native == native_fp16


def test_http_service_serves_a_quantized_artifact(quantized_artifact):
    from serve.server import create_app
    from tests.test_http import Server

    generator = Generator(quantized_artifact, prefix_cache_mb=0)
    expected = generator.generate("Hello, world", max_new_tokens=6, temperature=0)
    with Server(create_app(Generator(quantized_artifact))) as server:
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        response = httpx.post(f"{server.url}/v1/completions", json={
            "model": model, "prompt": "Hello, world", "max_tokens": 6, "temperature": 0}, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == expected.text


def test_quality_is_not_gated_on_text_the_tokenizer_cannot_read(tmp_path):
    """A word-level test tokenizer reads the held-out text as unknown ids: export records why quality was not
    measured instead of failing (or passing) on figures that mean nothing."""
    checkpoint = exportable_checkpoint(tmp_path / "ckpt", hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2)
    out = tmp_path / "int8"
    result = run_export("--model", str(checkpoint), "--quantize", "int8", "--out", str(out), "--engine", "onnx",
                        "--max-batch", "2", "--max-context", "64")
    assert result.returncode == 0, result.stderr
    report = Artifact.open(out).manifest.parity.reports["onnxruntime-cpu"]
    assert report["passed"] and "distinct ids" in report["quality"]["skipped"]

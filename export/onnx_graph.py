"""Trace the reference model into the one ONNX graph that both ONNX Runtime and TensorRT accept.

The form (docs/graph-form.md says why, and what else was measured): opset 24; per layer a static cache
``[batch, kv_heads, max_context, head_dim]`` updated by ``TensorScatter`` at per-row write indices; one
single-output ``Attention`` over the whole cache with an explicit boolean mask; interleaved ``RotaryEmbedding``;
``LayerNormalization`` without bias.
Batch and sequence length are dynamic; max_context is a fixed number, as TensorRT's KV-cache layer needs.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import onnxscript.optimizer
from onnxscript import ir
from torch._subclasses.fake_tensor import FakeTensorMode

from engines.base import (INPUT_IDS, KV_SLOTS, LOGITS, LOGITS_INDICES, WRITE_INDICES, GraphSpec, past_names,
                          present_names)
from reference.config import CohereConfig
from reference.model import CohereForCausalLM

from reference.quantize import WeightQuantization, quantized_linear_weights

from .gqa_graph import GQA_ONNX_FILE, write_gqa_graph
from .weights_writer import QuantizedWeight, StateDictWeights, WeightSource, WeightTensor, write_external_data

log = logging.getLogger(__name__)

OPSET = 24  # TensorScatter is new in opset 24
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PARAMETER_PREFIX = "model."  # DecoderStep.model: a graph initializer is named "model." + the checkpoint's name


class DecoderStep(torch.nn.Module):
    """The reference forward with flat tensor inputs and outputs, named as the manifest declares them."""

    def __init__(self, model: CohereForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, write_indices, logits_indices, kv_slots, *flat_caches):
        caches = list(zip(flat_caches[0::2], flat_caches[1::2]))
        logits, caches = self.model(input_ids, write_indices, logits_indices, caches, kv_slots)
        return (logits, *[t for pair in caches for t in pair])


def example_inputs(spec: GraphSpec, batch: int = 2, seq: int = 2) -> tuple[torch.Tensor, ...]:
    dtype = getattr(torch, spec.dtype)
    cache = (batch, *spec.cache_shape_per_row)
    return (torch.zeros(batch, seq, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64),
            torch.full((batch,), seq - 1, dtype=torch.int64), torch.arange(seq + 1, dtype=torch.int64),
            *[torch.zeros(cache, dtype=dtype) for _ in range(2 * spec.num_layers)])


def export_onnx(model: CohereForCausalLM, spec: GraphSpec, folder: Path,
                quantization: WeightQuantization | None = None) -> Path:
    """Export an in-memory model: its weights stream from its state dict through the same path as a checkpoint's."""
    return export_graph(model.config, StateDictWeights(model.state_dict()), spec, folder, quantization)


def export_graph(config: CohereConfig, weights: WeightSource, spec: GraphSpec, folder: Path,
                 quantization: WeightQuantization | None = None) -> Path:
    """Write ``folder/model.onnx`` and ``model.onnx.data`` (the weights as external data, in ``spec.dtype``, or
    quantized) and return the graph's path; also ``model.gqa.onnx``, ONNX Runtime CPU's variant of the graph over
    the same data file (export/gqa_graph.py). The graph is traced without weights; ``weights`` are then streamed into
    the data file one block at a time, so the export's memory does not grow with the model."""
    dtype = getattr(torch, spec.dtype)
    model = trace(config, spec)
    graph = model.graph
    for value in list(graph.initializers.values()):
        key = value.name.removeprefix(PARAMETER_PREFIX)
        value.const_value = WeightTensor(weights, key, dtype, name=value.name)
    _fold_weight_transposes(graph, weights, dtype)
    # The optimiser ``optimize=True`` runs, now that the weights are readable: constant folding (the rotary
    # tables, fp32 copies of the norm weights, shape arithmetic), dead code and duplicate constants. It never reads
    # a weight larger than its input size limit whole, which WeightTensor enforces.
    onnxscript.optimizer.optimize(model)
    if quantization is not None:  # after the optimiser, whose constant folding would fold small DequantizeLinears
        quantize_linear_weights(graph, weights, quantization, dtype,
                                set(quantized_linear_weights(config.num_hidden_layers)))

    path = folder / ONNX_FILE
    # Weights always go to external data, in the file the manifest names: one layout for every model size, and no
    # 2 GB protobuf limit.
    write_external_data(graph, folder, DATA_FILE)
    ir.save(model, path)
    write_gqa_graph(path, folder / GQA_ONNX_FILE, config.num_attention_heads, config.num_key_value_heads,
                    config.head_dim)
    return path


def trace(config: CohereConfig, spec: GraphSpec) -> ir.Model:
    """The decoder step as an ONNX model whose initializers carry no data, traced on fake tensors: a 35B model
    traces in the memory of a small one. (A ``meta``-device model does not trace: ``torch.onnx.ops.symbolic``
    returns CPU tensors, so attention would see two devices.) Parameters are built in the target dtype because a
    fake module cannot be converted with ``.to``."""
    # The exporter logs a warning per missing torchvision op at import; none of them concern this graph.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    default_dtype = torch.get_default_dtype()
    with warnings.catch_warnings(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        torch.set_default_dtype(getattr(torch, spec.dtype))
        try:
            step = DecoderStep(CohereForCausalLM(config).eval())
        finally:
            torch.set_default_dtype(default_dtype)
        # The exporter's own optimisation cannot read fake weights: export_graph runs it once they are readable.
        program = torch.onnx.export(step, example_inputs(spec), **export_arguments(spec), optimize=False)
    return program.model


def export_arguments(spec: GraphSpec) -> dict:
    """The arguments of ``torch.onnx.export`` that give the graph its form, names and dynamic dimensions."""
    # torch.export specialises dims traced at size 1, so the example has batch 2 and seq 2, and a Dim's range
    # must contain them; the engines still refuse a batch above max_batch.
    batch = torch.export.Dim("batch", min=1, max=max(2, spec.max_batch))
    seq = torch.export.Dim("seq", min=1, max=spec.max_context)
    cache_dims = {0: batch}
    # *flat_caches is one positional group to torch.export, so its shapes nest as one tuple.
    slots = torch.export.Dim("kv_slots", min=1, max=spec.max_context)
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch}, {0: batch}, {0: slots},
                      tuple([cache_dims] * (2 * spec.num_layers)))
    input_names = [INPUT_IDS, WRITE_INDICES, LOGITS_INDICES, KV_SLOTS]
    output_names = [LOGITS]
    for layer in range(spec.num_layers):
        input_names += past_names(layer)
        output_names += present_names(layer)
    return dict(dynamo=True, opset_version=OPSET, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, verbose=False, report=False)


def _fold_weight_transposes(graph: ir.Graph, weights: WeightSource, dtype: torch.dtype) -> None:
    """``nn.Linear`` traces as ``MatMul(x, Transpose(W))``. Replace each such Transpose by an initializer holding
    ``W^T`` (written transposed when streamed), named as the Transpose's output, as the optimiser folds it for
    in-memory weights."""
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or not source.is_initializer() or len(source.uses()) != 1:
            continue
        if tuple(node.attributes.get_ints("perm", ())) != (1, 0):
            continue
        output = node.outputs[0]
        tensor = WeightTensor(weights, source.const_value.key, dtype, transpose=True, name=output.name)
        folded = ir.Value(name=output.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor,
                          metadata_props={"pkg.onnxscript.optimizer.folded_from": str([source.name])})  # as it says
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        graph.register_initializer(folded)


def quantize_linear_weights(graph: ir.Graph, weights: WeightSource, quantization: WeightQuantization,
                            dtype: torch.dtype, names: set[str]) -> None:
    """Make every projection in ``names`` and the output projection multiply by quantized weights:
    ``MatMul(x, W^T)`` becomes ``MatMul(x, DequantizeLinear(q, scale))`` (blocked on axis 0, docs/graph-form.md),
    and the LM head's ``Gemm(h, W, transB=1)`` the same ``MatMul`` form. A tied embedding keeps its float table
    for the lookup; the LM head gets a quantized copy."""
    for node in list(graph):
        if node.op_type == "MatMul":
            weight = node.inputs[1]
            tensor = weight.const_value if weight is not None and weight.is_initializer() else None
            if not (isinstance(tensor, WeightTensor) and tensor.transpose and tensor.key in names):
                continue
            _dequantized_input(graph, node, 1, weights, tensor.key, quantization, dtype)
            if not weight.uses():
                graph.initializers.pop(weight.name)
        elif node.op_type == "Gemm" and _is_lm_head(node):
            key = node.inputs[1].const_value.key
            matmul = ir.node("MatMul", [node.inputs[0], node.inputs[1]], name=node.name)
            graph.insert_before(node, matmul)
            node.outputs[0].replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
            matmul.outputs[0].name, node.outputs[0].name = node.outputs[0].name, None
            graph.remove(node, safe=True)
            _dequantized_input(graph, matmul, 1, weights, key, quantization, dtype)


def _is_lm_head(node: ir.Node) -> bool:
    """``F.linear(h, W)`` on a 2-D ``h`` traces as ``Gemm(h, W, transB=1)``: only the LM head has a 2-D input."""
    weight = node.inputs[1] if len(node.inputs) == 2 else None
    tensor = weight.const_value if weight is not None and weight.is_initializer() else None
    attributes = node.attributes
    return (isinstance(tensor, WeightTensor) and not tensor.transpose and attributes.get_int("transB", 0) == 1
            and attributes.get_int("transA", 0) == 0 and attributes.get_float("alpha", 1.0) == 1.0)


def _dequantized_input(graph: ir.Graph, node: ir.Node, index: int, weights: WeightSource, key: str,
                       quantization: WeightQuantization, dtype: torch.dtype) -> None:
    """Feed input ``index`` of ``node`` from a DequantizeLinear of ``key``'s quantized ``W^T`` instead."""
    stem = f"{PARAMETER_PREFIX}{key}.{quantization.name}_block{quantization.block_size}"
    values = []
    for suffix, scales in (("", False), (".scale", True)):
        tensor = QuantizedWeight(weights, key, quantization, dtype, scales=scales, name=stem + suffix)
        value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    dequantize = ir.node("DequantizeLinear", values, attributes={"axis": 0, "block_size": quantization.block_size},
                         name=f"{stem}.dequantize")
    dequantize.outputs[0].name = f"{stem}.dequantized"
    graph.insert_before(node, dequantize)
    node.replace_input_with(index, dequantize.outputs[0])

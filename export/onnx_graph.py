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
from onnxscript import ir

from engines.base import (INPUT_IDS, KV_SLOTS, LOGITS, LOGITS_INDICES, WRITE_INDICES, GraphSpec, past_names,
                          present_names)
from reference.model import CohereForCausalLM

log = logging.getLogger(__name__)

OPSET = 24  # TensorScatter is new in opset 24
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


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


def export_onnx(model: CohereForCausalLM, spec: GraphSpec, folder: Path) -> Path:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data``, the weights as external data) and return its path."""
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

    path = folder / ONNX_FILE
    # The exporter logs a warning per missing torchvision op at import; none of them concern this graph.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        program = torch.onnx.export(
            DecoderStep(model), example_inputs(spec), dynamo=True, opset_version=OPSET,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            optimize=True, verbose=False, report=False)
        # Weights always go to external data, in the file the manifest names: one layout for every model size,
        # and no 2 GB protobuf limit. ``ir.save`` streams each tensor to disk, as ``program.save`` does (which
        # would choose the data file's name itself).
        ir.save(program.model, path, external_data=DATA_FILE)
    return path

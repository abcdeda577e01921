"""The ONNX Runtime CPU variant of the exported graph: each layer's cache update and attention as one
``com.microsoft::GroupQueryAttention``.

In the portable form (docs/graph-form.md) a decode step at context ``L`` runs, per layer, two ``TensorScatter``
(in place), two ``Slice`` that copy the filled prefix of the caches out, and an ``Attention`` over the copies,
expanding the key/value heads for the query groups. ONNX Runtime's ``GroupQueryAttention`` does the same work on
the cache buffers themselves: bound as both ``past_*`` and ``present_*`` (as the engine binds them), it writes the
new keys and values at each row's position and reads only the filled slots, without a copy (README, Long contexts:
on the 100M benchmark model it decodes 1.1x and prefills 1.4-2.6x faster than the portable graph at 2048-8176
tokens).

The variant is rewritten from the portable graph node for node, so it computes what the reference computes and is
verified against it as every engine is (export's parity step runs it). The new keys and values go in as they do
in the portable graph (after RoPE, and qk-norm where the model has it); only attention changes:

    TensorScatter(past_key, k) -> present_key ─ Slice ─┐
    TensorScatter(past_value, v) -> present_value ─ Slice ─┼─ Attention(q, ·, ·, mask) -> out [b, heads, s, d]
    q ────────────────────────────────────────────────┘

becomes ``GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length) -> out,
present_key, present_value``, with ``seqlens_k = write_indices + seq - 1`` (each row's last written slot) and
``total_sequence_length = len(kv_slots)``: row ``b``'s query ``i`` sees slots ``<= write_indices[b] + i``, the
portable graph's mask.

ONNX Runtime's CPU kernel takes a multi-token step over a non-empty cache one row at a time (it refuses
``batch > 1`` there); ``engines.onnxruntime`` splits such steps by row. The CUDA provider's kernel is fp16/bf16
only, and TensorRT's parser does not know the op: both run the portable graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.base import INPUT_IDS, KV_SLOTS, WRITE_INDICES

GQA_ONNX_FILE = "model.gqa.onnx"
CONTRIB_DOMAIN = "com.microsoft"


class GraphFormError(RuntimeError):
    """The portable graph is not in the form this rewrite expects (a change in the exporter or the reference)."""


def write_gqa_graph(onnx_path: Path, out_path: Path, num_heads: int, num_kv_heads: int, head_dim: int) -> Path:
    """Rewrite the portable graph at ``onnx_path`` into the GroupQueryAttention variant at ``out_path``. Only the
    graph is read and written: its initializers keep pointing at the same external data file, so the two graphs
    share one copy of the weights."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    rewrite(model, num_heads, num_kv_heads, head_dim)
    onnx.save(model, str(out_path))
    return out_path


def rewrite(model: onnx.ModelProto, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """In place: every ``Attention`` over sliced ``TensorScatter`` caches becomes a ``GroupQueryAttention``."""
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}

    def produced_by(name: str, op_type: str) -> onnx.NodeProto:
        node = producer.get(name)
        if node is None or node.op_type != op_type:
            found = node.op_type if node is not None else "a graph input or initializer"
            raise GraphFormError(f"{name} comes from {found}, expected {op_type}")
        return node

    replacements: dict[int, list[onnx.NodeProto]] = {}  # id of the Attention node -> the nodes replacing it
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "Attention":
            continue
        query, key_slice, value_slice = node.input[:3]
        slices = [produced_by(key_slice, "Slice"), produced_by(value_slice, "Slice")]
        scatters = [produced_by(s.input[0], "TensorScatter") for s in slices]
        (past_key, new_key), (past_value, new_value) = (s.input[:2] for s in scatters)
        name = node.output[0]
        nodes, flat = [], []
        for role, value in (("q", query), ("k", new_key), ("v", new_value)):  # [b, heads, s, d] -> [b, s, heads*d]
            nodes += [helper.make_node("Transpose", [value], [f"{name}.{role}_bsnh"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"{name}.{role}_bsnh", "gqa.flat_shape"], [f"{name}.{role}_flat"])]
            flat.append(f"{name}.{role}_flat")
        scale = next(a.f for a in node.attribute if a.name == "scale")
        nodes += [
            helper.make_node("GroupQueryAttention", [*flat, past_key, past_value, "gqa.seqlens_k", "gqa.total"],
                             [f"{name}.flat", scatters[0].output[0], scatters[1].output[0]], name=f"{name}.gqa",
                             domain=CONTRIB_DOMAIN, num_heads=num_heads, kv_num_heads=num_kv_heads, scale=scale),
            helper.make_node("Reshape", [f"{name}.flat", "gqa.heads_shape"], [f"{name}.bsnh"]),
            helper.make_node("Transpose", [f"{name}.bsnh"], [name], perm=[0, 2, 1, 3]),  # as Attention's output
        ]
        replacements[id(node)] = nodes
        removed |= {id(n) for n in (*slices, *scatters)}
    if not replacements:
        raise GraphFormError("the graph has no Attention node to rewrite")

    shared = [  # seqlens_k = int32(write_indices + seq - 1), total_sequence_length = int32(len(kv_slots))
        helper.make_node("Shape", [INPUT_IDS], ["gqa.seq"], start=1, end=2),
        helper.make_node("Add", [WRITE_INDICES, "gqa.seq"], ["gqa.end"]),
        helper.make_node("Sub", ["gqa.end", "gqa.one"], ["gqa.last"]),
        helper.make_node("Cast", ["gqa.last"], ["gqa.seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [KV_SLOTS], ["gqa.slots"]),
        helper.make_node("Squeeze", ["gqa.slots"], ["gqa.slots_scalar"]),
        helper.make_node("Cast", ["gqa.slots_scalar"], ["gqa.total"], to=TensorProto.INT32),
    ]
    nodes = []
    for node in graph.node:
        if id(node) in replacements:
            nodes += shared + replacements[id(node)]
            shared = []
        elif id(node) not in removed:
            nodes.append(node)
    nodes = _live(nodes, {output.name for output in graph.output})  # the mask and slot arithmetic are now dead
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa.one"),
                              numpy_helper.from_array(np.array([0, 0, -1], np.int64), "gqa.flat_shape"),
                              numpy_helper.from_array(np.array([0, 0, num_heads, head_dim], np.int64),
                                                      "gqa.heads_shape")])
    used = {name for node in nodes for name in node.input}
    live_initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live_initializers)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in their order."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(output in needed for output in node.output):
            live.append(node)
            needed |= set(node.input)
    return live[::-1]

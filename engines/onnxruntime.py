"""ONNX Runtime engine: CPU, or the CUDA execution provider when onnxruntime-gpu and a GPU are present.

The KV caches are OrtValues allocated once per ``allocate`` and bound through IO binding as both the ``past_*``
input and the ``present_*`` output of every step. ONNX Runtime's TensorScatter kernel sees the same buffer on
both sides and skips its copy of the whole cache, so a decode step writes one slot per layer instead of copying
``max_context`` slots.

Prefix caching copies ranges of cache slots with two small graphs of its own, run through IO binding on the
caches' own buffers (on CUDA the Python API has no device copy of part of an OrtValue): ``Slice`` copies slots
out into new OrtValues on the device, and ``TensorScatter``, with the cache bound as its input and output as in a
step, writes them back in place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .base import (INPUT_IDS, KV_SLOTS, LOGITS, LOGITS_INDICES, WRITE_INDICES, Engine, EngineError, GraphSpec,
                   past_names, present_names)

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}
ONNX_DTYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}
SLOT_COPY_OPSET = 24  # TensorScatter, as the decoder graph


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def execution_providers(device: str, dtype: str) -> list:
    """The providers (with options) for a session on ``device`` running a ``dtype`` graph.

    The CUDA execution provider's ``use_tf32`` defaults to 1: fp32 MatMul/Gemm round their inputs to 10-bit
    mantissas, which moves fp32 logits past the 1e-4 fp32 parity tolerance, so fp32 graphs turn it off (as the
    TensorRT build clears ``BuilderFlag.TF32``). fp16 graphs keep the provider's defaults.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda_options = {"use_tf32": "0"} if dtype == "float32" else {}
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


@dataclasses.dataclass
class OrtCacheState:
    batch: int
    caches: list[tuple[ort.OrtValue, ort.OrtValue]]  # per layer (key, value), on the engine's device


class OnnxRuntimeEngine(Engine):
    def __init__(self, onnx_path: Path, spec: GraphSpec, device: str = "auto", threads: int | None = None,
                 profile_prefix: str | None = None, matmul_nbits_accuracy_level: int | None = None,
                 group_query_attention: bool = False):
        """``device``: "cpu", "cuda" or "auto" (CUDA when the CUDA execution provider is available).
        ``group_query_attention``: the graph is export/gqa_graph.py's variant, whose attention kernel takes a
        multi-token step over a non-empty cache one row at a time: such steps run row by row.
        ``profile_prefix``: turn on ONNX Runtime's profiler (``session.end_profiling()`` writes the trace).
        ``matmul_nbits_accuracy_level``: for a quantized graph, the precision of the activations inside the
        ``MatMulNBits`` kernels ONNX Runtime fuses its dequantized MatMuls into: 1 keeps them in fp32, 4 quantizes
        them to int8 (the artifact's manifest records the level it was verified at)."""
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if device == "cuda" and not cuda_available():
            raise EngineError("device='cuda' needs onnxruntime-gpu and a CUDA GPU; available providers: "
                              + ", ".join(ort.get_available_providers()))
        self.spec, self.device = spec, device
        self.onnx_path, self.group_query_attention = Path(onnx_path), group_query_attention
        self.backend = f"onnxruntime-{device}"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No CPU arena: it keeps the largest step's buffers for the session's life (one 2000-token prefill of the
        # 100M model left 430 MB in it, 2.6x the weights resident). Without it they go back to malloc after each
        # run; decode speed is the same (README, Memory). The CUDA provider's own arena is not affected.
        options.enable_cpu_mem_arena = False
        # Default: one intra-op thread per physical core, which is what a GEMV-bound decode step wants.
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = int(os.environ.get("COHERE_DEPLOY_ORT_LOG_LEVEL", 3))
        if matmul_nbits_accuracy_level is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                             str(matmul_nbits_accuracy_level))
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        providers = execution_providers(device, spec.dtype)
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile classes
            raise EngineError(f"{onnx_path}: ONNX Runtime cannot load it: {e}") from None
        self._np_dtype = NUMPY_DTYPES[spec.dtype]
        self._row_bytes = int(np.prod(spec.cache_shape_per_row)) * np.dtype(self._np_dtype).itemsize
        self._check_session_io(onnx_path)
        self._session_options, self._providers = options, providers
        self._slot_sessions: dict[str, ort.InferenceSession] = {}  # "save", "load": built on first use

    @classmethod
    def from_artifact(cls, artifact, device: str = "auto", portable: bool = False, **options) -> "OnnxRuntimeEngine":
        """The engine for an opened ``engines.Artifact``, as its manifest says to run it: on CPU its
        GroupQueryAttention variant where it has one (unless ``portable``), elsewhere the portable graph; a quantized
        artifact at the accuracy level it was verified at. ``options``: more arguments of the constructor."""
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        graph, quantization = artifact.manifest.graph, artifact.manifest.quantization
        gqa = device == "cpu" and graph.onnxruntime_cpu_file is not None and not portable
        return cls(artifact.path(graph.onnxruntime_cpu_file if gqa else graph.onnx_file), artifact.spec,
                   device=device, group_query_attention=gqa,
                   matmul_nbits_accuracy_level=quantization and quantization.onnxruntime_accuracy_level, **options)

    def _check_session_io(self, onnx_path: Path) -> None:
        """The graph's inputs and outputs must be the spec's: names, dtypes and static dims. A graph that disagrees
        with its manifest is refused here, on open, instead of failing every request."""
        onnx_types = {"int64": "tensor(int64)", "float32": "tensor(float)", "float16": "tensor(float16)"}
        declared = self.spec.io()
        for section, values in (("inputs", self.session.get_inputs()), ("outputs", self.session.get_outputs())):
            actual = {v.name: v for v in values}
            expected = declared[section]
            if set(actual) != set(expected):
                extra, missing = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
                raise EngineError(f"{onnx_path}: the graph's {section} differ from the artifact's spec (in the "
                                  f"graph only: {', '.join(extra[:5]) or 'none'}; missing: "
                                  f"{', '.join(missing[:5]) or 'none'})")
            for name, want in expected.items():
                got = actual[name]
                static = [d if isinstance(d, int) else None for d in got.shape]
                if got.type != onnx_types[want["dtype"]] or len(got.shape) != len(want["shape"]) or any(
                        isinstance(w, int) and w != d for w, d in zip(want["shape"], static)):
                    raise EngineError(f"{onnx_path}: {section[:-1]} {name} is {got.type} {got.shape}; the artifact's "
                                      f"spec declares {want['dtype']} {want['shape']}")

    def allocate(self, batch: int) -> OrtCacheState:
        if not 1 <= batch <= self.spec.max_batch:
            raise ValueError(f"batch {batch} outside [1, max_batch={self.spec.max_batch}] of this artifact")
        shape = (batch, *self.spec.cache_shape_per_row)

        def zeros() -> ort.OrtValue:
            if self.device == "cpu":  # ORT wraps the numpy buffer without copying it
                return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self._np_dtype))
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._np_dtype, "cuda", 0)
            value.update_inplace(np.zeros(shape, self._np_dtype))
            return value

        return OrtCacheState(batch, [(zeros(), zeros()) for _ in range(self.spec.num_layers)])

    def _check_open(self) -> None:
        if self.session is None:
            raise EngineError("this ONNX Runtime engine is closed; open the artifact again")

    def _step(self, state: OrtCacheState, input_ids, write_indices, logits_indices, first_row: int) -> np.ndarray:
        self._check_open()
        rows, seq = input_ids.shape
        if self.group_query_attention and rows > 1 and seq > 1 and write_indices.any():
            return np.concatenate([self._run(state, input_ids[r:r + 1], write_indices[r:r + 1],
                                             logits_indices[r:r + 1], first_row + r) for r in range(rows)])
        return self._run(state, input_ids, write_indices, logits_indices, first_row)

    def _run(self, state: OrtCacheState, input_ids, write_indices, logits_indices, first_row: int) -> np.ndarray:
        """One session run over rows ``[first_row, first_row + rows)`` of the state."""
        rows = input_ids.shape[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(WRITE_INDICES, write_indices)
        binding.bind_cpu_input(LOGITS_INDICES, logits_indices)
        # Attention reads only the filled prefix of the static cache: a step at position 64 does not pay for 2048.
        binding.bind_cpu_input(KV_SLOTS, np.arange(write_indices.max() + input_ids.shape[1], dtype=np.int64))
        binding.bind_output(LOGITS, "cpu")  # bound first: get_outputs() follows binding order
        # Rows [first_row, first_row + rows) of a [batch, ...] cache are a contiguous range of its buffer: bound by
        # address, a step over fewer rows reads and writes only theirs.
        shape = (rows, *self.spec.cache_shape_per_row)
        offset = first_row * self._row_bytes
        for layer, caches in enumerate(state.caches):
            for past, present, value in zip(past_names(layer), present_names(layer), caches):
                binding.bind_input(past, self.device, 0, self._np_dtype, shape, value.data_ptr() + offset)
                binding.bind_output(present, self.device, 0, self._np_dtype, shape,
                                    value.data_ptr() + offset)  # in place
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _slot_session(self, kind: str) -> ort.InferenceSession:
        """The graph that copies slots of one row of every cache (``cache_{i}``: layer i // 2, key or value) out to
        ``block_{i}`` ("save": Slice on the slot axis) or back in at ``write_index`` ("load": TensorScatter)."""
        self._check_open()
        if kind in self._slot_sessions:
            return self._slot_sessions[kind]
        heads, context, head_dim = self.spec.cache_shape_per_row
        dtype = ONNX_DTYPES[self.spec.dtype]
        caches = range(2 * self.spec.num_layers)
        cache_inputs = [helper.make_tensor_value_info(f"cache_{i}", dtype, [1, heads, context, head_dim])
                        for i in caches]
        blocks = [helper.make_tensor_value_info(f"block_{i}", dtype, [1, heads, "count", head_dim]) for i in caches]
        if kind == "save":
            bounds = [helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in ("start", "end")]
            axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
            nodes = [helper.make_node("Slice", [f"cache_{i}", "start", "end", "axes"], [f"block_{i}"]) for i in caches]
            graph = helper.make_graph(nodes, "save_slots", cache_inputs + bounds, blocks, initializer=[axes])
        else:
            index = helper.make_tensor_value_info("write_index", TensorProto.INT64, [1])
            outputs = [helper.make_tensor_value_info(f"present_{i}", dtype, [1, heads, context, head_dim])
                       for i in caches]
            nodes = [helper.make_node("TensorScatter", [f"cache_{i}", f"block_{i}", "write_index"],
                                      [f"present_{i}"], axis=2) for i in caches]
            graph = helper.make_graph(nodes, "load_slots", cache_inputs + blocks + [index], outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SLOT_COPY_OPSET)])
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), self._session_options, providers=self._providers)
        self._slot_sessions[kind] = session
        return session

    def _bind_row(self, binding, state: OrtCacheState, row: int, outputs: bool) -> None:
        """Bind row ``row`` of every cache (a contiguous range of its buffer) as ``cache_{i}`` (and ``present_{i}``:
        in place)."""
        shape = (1, *self.spec.cache_shape_per_row)
        for i, value in enumerate(value for pair in state.caches for value in pair):
            address = value.data_ptr() + row * self._row_bytes
            binding.bind_input(f"cache_{i}", self.device, 0, self._np_dtype, shape, address)
            if outputs:
                binding.bind_output(f"present_{i}", self.device, 0, self._np_dtype, shape, address)

    def _save_slots(self, state: OrtCacheState, row: int, start: int, count: int) -> list[ort.OrtValue]:
        session = self._slot_session("save")
        binding = session.io_binding()
        self._bind_row(binding, state, row, outputs=False)
        binding.bind_cpu_input("start", np.array([start], dtype=np.int64))
        binding.bind_cpu_input("end", np.array([start + count], dtype=np.int64))
        for i in range(2 * self.spec.num_layers):
            binding.bind_output(f"block_{i}", self.device)  # allocated by ONNX Runtime on the device
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _load_slots(self, state: OrtCacheState, row: int, start: int, block: list[ort.OrtValue]) -> None:
        session = self._slot_session("load")
        binding = session.io_binding()
        self._bind_row(binding, state, row, outputs=True)
        binding.bind_cpu_input("write_index", np.array([start], dtype=np.int64))
        for i, value in enumerate(block):
            binding.bind_ortvalue_input(f"block_{i}", value)
        session.run_with_iobinding(binding)

    def _block_count(self, block: list[ort.OrtValue]) -> int:
        return block[0].shape()[2]

    def read_cache(self, state: OrtCacheState) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(k.numpy().copy(), v.numpy().copy()) for k, v in state.caches]

    def close(self) -> None:
        """Drop the session: ONNX Runtime frees it, with its memory arena (on CUDA, GPU memory), when the last
        reference goes. The caches of states already allocated belong to those states."""
        self.session = None
        self._slot_sessions = {}

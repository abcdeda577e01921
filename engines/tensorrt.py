"""Run a TensorRT plan on a GPU: ``TensorRTEngine``; ``engines.tensorrt_build`` builds the plan.

Running needs the full ``tensorrt`` module (TensorRT 10.15 to 11.x) and a CUDA GPU; ``runtime_available()`` says
why not. ``tensorrt`` is imported inside the functions that need it, so this module loads anywhere.

Each ``present_*`` output of the plan aliases its ``past_*`` input: the engine binds both to one cache buffer per
layer, which TensorRT's KV-cache update layer writes in place.

Decode attends over a bucket of cache slots (``kv_slots = arange(bucket)``), the smallest of ``kv_buckets`` that
covers the longest live row, with one CUDA graph per (rows, bucket): a short conversation does not read all
``max_context`` slots at every step, and the number of decode shapes, so of graphs, stays small.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import numpy as np
import torch

from engines.artifact import TensorRTPlan
from engines.base import (INPUT_IDS, KV_SLOTS, LOGITS, LOGITS_INDICES, WRITE_INDICES, Engine, EngineError, GraphSpec,
                          past_names, present_names)

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"  # optimisation profile names, in profile index order
SMALLEST_KV_BUCKET = 256


def kv_buckets(max_context: int) -> list[int]:
    """The cache-slot counts decode attends over: powers of two from 256 below ``max_context``, then
    ``max_context`` itself (so every context has a bucket, and one below 256 has only ``max_context``).

    Powers of two, as vLLM's and TensorRT-LLM's CUDA-graph batch sizes are: a step reads at most twice the slots
    it needs, and an 8192 context needs six graphs per row count, not one per position.
    """
    buckets, size = [], SMALLEST_KV_BUCKET
    while size < max_context:
        buckets.append(size)
        size *= 2
    return buckets + [max_context]


def kv_bucket(buckets: list[int], write_indices: np.ndarray, seq: int) -> int:
    """The smallest bucket holding every row's context after this step (``write_indices + seq`` slots)."""
    needed = int(write_indices.max()) + seq
    for bucket in buckets:
        if bucket >= needed:
            return bucket
    raise ValueError(f"a row needs {needed} cache slots; the largest bucket is {buckets[-1]}")


def make_logger(trt):
    """A TensorRT logger that keeps every message (for tensorrt_build.log) and forwards them to ``logging``."""

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity > trt.ILogger.Severity.INFO:  # VERBOSE: thousands of lines per build
                return
            level = severity.name if hasattr(severity, "name") else str(severity)
            self.lines.append(f"[{level}] {msg}")
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return RecordingLogger()


def gpu_description() -> dict | None:
    """The name and compute capability of the current CUDA device; None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def runtime_available() -> tuple[bool, str]:
    """Whether a TensorRT plan can run here (the full ``tensorrt`` module and a CUDA GPU), and if not, why."""
    try:
        import tensorrt
    except ImportError:
        try:
            import tensorrt_rtx  # noqa: F401
        except ImportError:
            return False, "the tensorrt module is not installed (it comes from NVIDIA's package index)"
        return False, ("only tensorrt_rtx is installed: it builds plans on CPU but running one needs the full "
                       "tensorrt module and a GPU")
    if not torch.cuda.is_available():
        return False, f"tensorrt {tensorrt.__version__} is installed but there is no CUDA device"
    return True, f"tensorrt {tensorrt.__version__} on {torch.cuda.get_device_name()}"


def plan_mismatch(plan: TensorRTPlan, module: str, version: str, gpu: dict | None) -> str | None:
    """Why a plan described by ``plan`` cannot be loaded by ``module`` ``version`` on ``gpu``; None if it can.

    A plan is tied to the exact TensorRT version, and (without hardware-compatibility mode, which this project does
    not use) to the GPU model it was built on, not only its compute capability: NVIDIA's support matrix says such
    engines are not portable across devices, and H100 SXM, H100 PCIe and H200 all report 9.0 with different
    memory systems the builder timed its kernels for. Deserialising a foreign plan fails deep inside TensorRT, or
    worse, so compare the device name too and refuse with a message that says to rebuild.
    """
    if plan.module != module or plan.version != version:
        return (f"the plan was built by {plan.module} {plan.version} but this is {module} "
                f"{version}; rebuild the TensorRT artifact here")
    built_on = plan.gpu
    if built_on is None:
        return "the plan was built without a GPU (an offline TensorRT-RTX build); rebuild it on this GPU"
    if gpu is None or (built_on.get("name"), built_on.get("compute_capability")) != (gpu["name"],
                                                                                      gpu["compute_capability"]):
        return (f"the plan was built for {built_on.get('name')} (compute capability "
                f"{built_on.get('compute_capability')}) but this GPU is "
                f"{gpu and gpu['name']} ({gpu and gpu['compute_capability']}); rebuild it on this GPU")
    return None


def plan_unusable_reason(plan: TensorRTPlan) -> str | None:
    """Why the artifact's (built) TensorRT plan cannot run here; None when it can."""
    ok, why = runtime_available()
    if not ok:
        return why
    import tensorrt as trt

    return plan_mismatch(plan, trt.__name__, trt.__version__, gpu_description())


def kv_slots_profile_problem(plan: TensorRTPlan, max_context: int) -> str | None:
    """Why the plan's profiles cannot take every ``kv_slots`` count this engine passes, [1, max_context]; None if
    they can. Plans built before decode buckets declared kv_slots = max_context only."""
    for profile in plan.profiles:
        declared = profile["shapes"][KV_SLOTS]
        if (declared["min"][0], declared["max"][0]) != (1, max_context):
            return (f"the {profile['name']} profile takes kv_slots [{declared['min'][0]}, {declared['max'][0]}], "
                    f"this engine passes any count in [1, {max_context}]; rebuild the TensorRT artifact")
    return None


class TensorRTState:
    """One batch's KV caches on the GPU, its fixed decode IO buffers and its captured decode CUDA graphs."""

    def __init__(self, batch: int, caches: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor,
                 decode_inputs: dict[str, torch.Tensor]):
        self.batch = batch
        self.caches = caches
        self.logits = logits
        self.decode_inputs = decode_inputs  # fixed addresses, so a captured graph can be replayed
        # decode graphs of rows [0, rows) by (rows, kv bucket)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}


class _ProfileContext:
    """An execution context fixed to one optimisation profile, and what is bound to it (to rebind only changes)."""

    def __init__(self, context, profile: int):
        self.context = context
        self.profile = profile
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}


class TensorRTEngine(Engine):
    """Runs ``model.plan`` with ``execute_async_v3``; decode steps from row 0 replay a CUDA graph once captured, one
    per number of rows and bucket of cache slots (``kv_buckets``), captured the second time that shape is stepped.

    One execution context per optimisation profile (prefill, decode), both on one device-memory buffer, as
    TensorRT-LLM's runtime does: a context never switches profiles, so the decode graphs captured on the decode
    context stay valid whatever prefills run in between. The contexts run one at a time on the engine's stream,
    which is what makes sharing the activation memory safe (TensorRT forbids it only for parallel contexts).
    ``close()`` (or leaving a ``with`` block) frees the graphs, contexts, device memory and stream in that order.
    """

    backend = "tensorrt"

    def __init__(self, folder: Path, spec: GraphSpec, section: TensorRTPlan, use_cuda_graphs: bool = True):
        ok, why = runtime_available()
        if not ok:
            raise EngineError(f"cannot run a TensorRT plan here: {why}")
        import tensorrt as trt

        self._trt = trt
        self.spec = spec
        self.device = torch.device("cuda", torch.cuda.current_device())
        plan_path = Path(folder) / section.plan_file
        mismatch = plan_mismatch(section, trt.__name__, trt.__version__, gpu_description())
        if mismatch:
            raise EngineError(f"{plan_path}: {mismatch}")
        # Artifact.open verified the plan's sha256 against the manifest; it is not hashed again here.
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialise {plan_path}: " + "; ".join(self._logger.errors))
        self._check_engine_io(plan_path)
        names = [p["name"] for p in section.profiles]
        if names != [PREFILL, DECODE] or self._engine.num_optimization_profiles != 2:
            raise EngineError(f"{plan_path}: expected profiles [{PREFILL}, {DECODE}], the manifest lists {names} "
                              f"and the plan has {self._engine.num_optimization_profiles}")

        self._prefill_max_seq = section.profiles[0]["shapes"][INPUT_IDS]["max"][1]
        self._kv_buckets = kv_buckets(spec.max_context)
        refused = kv_slots_profile_problem(section, spec.max_context)
        if refused:
            raise EngineError(f"{plan_path}: {refused}")
        self._stream = torch.cuda.Stream(self.device)
        # device_memory_size_v2: the largest activation memory over all profiles, so one buffer serves both
        # contexts. torch's allocator aligns blocks to 512 bytes; TensorRT needs 256.
        self._device_memory = torch.empty(self._engine.device_memory_size_v2, dtype=torch.uint8, device=self.device)
        self._contexts = [self._create_context(profile, plan_path) for profile in range(2)]
        self._states_with_graphs: weakref.WeakSet[TensorRTState] = weakref.WeakSet()
        self._use_cuda_graphs = use_cuda_graphs
        self.last_step_used_graph = False  # for tests and benchmarks: did the last step replay a graph?
        self.last_step_kv_slots = 0  # and how many cache slots did its attention read?

    def _create_context(self, profile: int, plan_path: Path) -> _ProfileContext:
        context = self._engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan_path}: "
                              + "; ".join(self._logger.errors))
        context.set_device_memory(self._device_memory.data_ptr(), self._device_memory.numel())
        try:
            context.set_optimization_profile_async(profile, self._stream.cuda_stream)
        except RuntimeError as e:  # the Python binding raises where the C++ API returns false
            raise EngineError(f"{plan_path}: TensorRT refused optimisation profile {profile} ({e}): "
                              + "; ".join(self._logger.errors)) from None
        return _ProfileContext(context, profile)

    def _check_engine_io(self, plan_path: Path) -> None:
        trt, engine, io = self._trt, self._engine, self.spec.io()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(names) - inputs
        if inputs != set(io["inputs"]) or outputs != set(io["outputs"]):
            raise EngineError(f"{plan_path}: engine IO {sorted(inputs)} -> {sorted(outputs)} differs from the "
                              f"manifest's graph IO {sorted(io['inputs'])} -> {sorted(io['outputs'])}")
        cache_dtype = {"float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT}[self.spec.dtype]
        for layer in range(self.spec.num_layers):
            for past, present in zip(past_names(layer), present_names(layer)):
                if engine.get_tensor_dtype(past) != cache_dtype:
                    raise EngineError(f"{plan_path}: {past} is {engine.get_tensor_dtype(past)}, the manifest says "
                                      f"{self.spec.dtype}")
                # The cache update writes in place; the engine must agree that present_* is past_*'s memory.
                if hasattr(engine, "get_aliased_input_tensor") and engine.get_aliased_input_tensor(present) != past:
                    raise EngineError(f"{plan_path}: output {present} does not alias input {past}; the KV cache "
                                      "would not be updated in place")

    def _check_open(self) -> None:
        if self._contexts is None:
            raise EngineError("this TensorRT engine is closed; open the artifact again")

    def allocate(self, batch: int) -> TensorRTState:
        self._check_open()
        if not 1 <= batch <= self.spec.max_batch:
            raise ValueError(f"batch {batch} must lie in [1, max_batch={self.spec.max_batch}]")
        dtype = getattr(torch, self.spec.dtype)
        shape = (batch, *self.spec.cache_shape_per_row)
        with torch.cuda.stream(self._stream):
            caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                       torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(self.spec.num_layers)]
            logits = torch.empty(batch, self.spec.vocab_size, dtype=torch.float32, device=self.device)
            decode_inputs = {INPUT_IDS: torch.zeros(batch, 1, dtype=torch.int64, device=self.device),
                             WRITE_INDICES: torch.zeros(batch, dtype=torch.int64, device=self.device),
                             LOGITS_INDICES: torch.zeros(batch, dtype=torch.int64, device=self.device),
                             KV_SLOTS: torch.arange(self.spec.max_context, dtype=torch.int64, device=self.device)}
        self._stream.synchronize()
        return TensorRTState(batch, caches, logits, decode_inputs)

    def _bind(self, bound: _ProfileContext, inputs: dict[str, torch.Tensor], state: TensorRTState,
              first_row: int, rows: int) -> bool:
        """Point the context at these tensors (rows ``[first_row, first_row + rows)`` of the state's caches, a
        contiguous range of each buffer); calls TensorRT only for what changed. True if anything did."""
        changed = False
        input_tensors, output_tensors = dict(inputs), {LOGITS: state.logits[:rows]}
        for layer, (k, v) in enumerate(state.caches):
            for past, present, cache in zip(past_names(layer), present_names(layer), (k, v)):
                # in place: one buffer for both; a view of a row range keeps the buffer's device addresses
                input_tensors[past] = output_tensors[present] = cache[first_row:first_row + rows]
        for name, tensor in input_tensors.items():
            shape = tuple(tensor.shape)
            if bound.shapes.get(name) != shape:
                if not bound.context.set_input_shape(name, shape):
                    raise EngineError(f"TensorRT refused shape {shape} for input {name} under profile "
                                      f"{bound.profile}")
                bound.shapes[name] = shape
                changed = True
        for name, tensor in {**input_tensors, **output_tensors}.items():
            if bound.addresses.get(name) != tensor.data_ptr():
                if not bound.context.set_tensor_address(name, tensor.data_ptr()):
                    raise EngineError(f"TensorRT refused the device address of {name}")
                bound.addresses[name] = tensor.data_ptr()
                changed = True
        return changed

    def _execute(self, bound: _ProfileContext) -> None:
        if not bound.context.execute_async_v3(self._stream.cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed: " + "; ".join(self._logger.errors[-5:]))

    def _capture(self, bound: _ProfileContext, state: TensorRTState, key: tuple[int, int]) -> None:
        """Record the decode step of this state over ``key = (rows, kv bucket)`` in a CUDA graph; on failure, run
        eagerly."""
        # is_stream_capturable is in TensorRT-RTX's bindings; guarded, as not every TensorRT 10.x binding has it.
        if hasattr(bound.context, "is_stream_capturable") and not bound.context.is_stream_capturable(
                self._stream.cuda_stream):
            log.warning("tensorrt: this execution context cannot be captured in a CUDA graph; decoding eagerly")
            self._use_cuda_graphs = False
            return
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: only this thread must avoid capture-unsafe CUDA calls; TensorRT's own helper threads
            # may make them without invalidating the capture.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._execute(bound)
        except (RuntimeError, EngineError) as e:
            log.warning("tensorrt: CUDA graph capture of the decode step failed (%s); decoding eagerly", e)
            self._use_cuda_graphs = False
            return
        state.graphs[key] = graph
        self._states_with_graphs.add(state)

    def _step(self, state: TensorRTState, input_ids: np.ndarray, write_indices: np.ndarray,
              logits_indices: np.ndarray, first_row: int) -> np.ndarray:
        self._check_open()
        (rows, seq), decode = input_ids.shape, input_ids.shape[1] == 1
        if input_ids.shape[1] > self._prefill_max_seq:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens per row; the plan's prefill profile takes "
                             f"at most {self._prefill_max_seq} (prefill longer prompts in chunks)")
        host = {INPUT_IDS: input_ids, WRITE_INDICES: write_indices, LOGITS_INDICES: logits_indices}
        bound = self._contexts[1 if decode else 0]
        # Decode reads a bucket of slots (few shapes, so few graphs); prefill, never captured, reads exactly the
        # filled prefix, as ONNX Runtime does. Both are a prefix of one arange buffer: no host copy.
        slots = kv_bucket(self._kv_buckets, write_indices, 1) if decode else int(write_indices.max()) + seq
        self.last_step_used_graph = False
        self.last_step_kv_slots = slots
        with torch.cuda.stream(self._stream):
            if decode:
                inputs = {name: buffer[:rows] for name, buffer in state.decode_inputs.items() if name != KV_SLOTS}
                for name, array in host.items():
                    inputs[name].copy_(torch.from_numpy(array))
            else:
                inputs = {name: torch.from_numpy(array).to(self.device) for name, array in host.items()}
            inputs[KV_SLOTS] = state.decode_inputs[KV_SLOTS][:slots]
            changed = self._bind(bound, inputs, state, first_row, rows)
            key = (rows, slots)
            # Graphs are keyed by (rows, bucket) and hold the cache addresses of rows [0, rows): a step from another
            # first_row (a scheduler's rare decode of a row range) runs eagerly, neither replaying nor capturing.
            if decode and first_row == 0 and self._use_cuda_graphs and not changed:
                # TensorRT needs one eager enqueue after any shape/address change before capture or replay is
                # valid, which the `changed` step before this one did: it leaves the context's host-side state at
                # this (rows, bucket), which the graph of this same key replays. Each switch runs once eagerly.
                if key not in state.graphs:
                    self._capture(bound, state, key)
                if key in state.graphs:
                    state.graphs[key].replay()
                    self.last_step_used_graph = True
            if not self.last_step_used_graph:
                self._execute(bound)
            logits = state.logits[:rows].cpu()  # waits for the stream
        return logits.numpy()

    def _save_slots(self, state: TensorRTState, row: int, start: int, count: int) -> torch.Tensor:
        """``[layers * 2, kv_heads, count, head_dim]`` on the GPU: every layer's key then value slots, copied on
        the engine's stream (ordered after the steps that wrote them)."""
        self._check_open()
        with torch.cuda.stream(self._stream):
            return torch.stack([cache[row, :, start:start + count] for pair in state.caches for cache in pair])

    def _load_slots(self, state: TensorRTState, row: int, start: int, block: torch.Tensor) -> None:
        """In place, on the engine's stream: the caches keep their addresses, so bindings and CUDA graphs stay
        valid."""
        self._check_open()
        count = block.shape[2]
        with torch.cuda.stream(self._stream):
            for cache, slots in zip((cache for pair in state.caches for cache in pair), block):
                cache[row, :, start:start + count].copy_(slots)

    def _block_count(self, block: torch.Tensor) -> int:
        return block.shape[2]

    def read_cache(self, state: TensorRTState) -> list[tuple[np.ndarray, np.ndarray]]:
        self._check_open()
        self._stream.synchronize()
        return [(k.cpu().numpy(), v.cpu().numpy()) for k, v in state.caches]

    def close(self) -> None:
        """Free the CUDA graphs, the execution contexts, their device memory, the engine and the stream, in that
        order (a context must go before its engine, the engine before its runtime). Idempotent."""
        if self._contexts is None:
            return
        self._stream.synchronize()
        for state in list(self._states_with_graphs):
            for graph in state.graphs.values():
                graph.reset()
            state.graphs.clear()
        self._states_with_graphs = weakref.WeakSet()
        self._contexts = None
        self._device_memory = None
        self._engine = None
        self._runtime = None
        self._stream = None

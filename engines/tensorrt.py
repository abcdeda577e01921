"""Build an fp16 TensorRT plan from the exported ONNX graph, and run it on a GPU.

Building (``build_plan``) needs only the ONNX parser and builder: the full ``tensorrt`` module on a GPU machine,
or ``tensorrt_rtx`` anywhere, CPU included (its plans are portable across RTX-class GPUs, not H100). Running
(``TensorRTEngine``) needs the full ``tensorrt`` module and a CUDA GPU; ``runtime_available()`` says why not.

The graph form is the one in shared/TENSORRT.md: per layer, two ``TensorScatter`` become ``KV_CACHE_UPDATE``
layers that update a static ``[batch, kv_heads, max_context, head_dim]`` cache in place, so each ``present_*``
output is bound to the same device address as its ``past_*`` input.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from engines.artifact import TensorRTPlan
from engines.base import (INPUT_IDS, KV_SLOTS, LOGITS, LOGITS_INDICES, WRITE_INDICES, Engine, EngineError, GraphSpec,
                          past_names, present_names)

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
BUILD_LOG_FILE = "tensorrt_build.log"
PREFILL, DECODE = "prefill", "decode"  # optimisation profile names, in profile index order
PREFILL_OPT_SEQ = 512  # the prompt length the prefill profile's kernels are tuned for (clamped to its max)

# ONNX op -> the native TensorRT layer it must become, and how many each decoder layer has. Anything else means
# the parser decomposed the op into generic layers: slower, and for the cache, no in-place update.
NATIVE_OPS = {"TensorScatter": ("KV_CACHE_UPDATE", 2), "RotaryEmbedding": ("ROTARY_EMBEDDING", 2),
              "Attention": ("ATTENTION", 1), "LayerNormalization": ("NORMALIZATION", 1)}
NATIVE_LAYER_TYPES = [layer_type for layer_type, _ in NATIVE_OPS.values()]


def _import_trt():
    """The full TensorRT when installed (it can build and run), else TensorRT-RTX (builds on CPU only)."""
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_rtx as trt
        except ImportError:
            raise EngineError("neither 'tensorrt' nor 'tensorrt_rtx' is installed; pip install tensorrt "
                              "(NVIDIA's index, GPU machines) or tensorrt-rtx-cu13 (builds plans on CPU)") from None
    return trt


def _make_logger(trt):
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


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


# ---------------------------------------------------------------------------------------------------- building


def unsupported_graph_forms(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT cannot take (or would silently miscompute) this graph; empty when the form is fine.

    Measured in shared/TENSORRT.md: the parser rejects Attention with past/present tensors or several outputs,
    ignores ``nonpad_kv_seqlen`` and aligns ``is_causal`` top-left, so a decode step would attend to the wrong
    keys without any error.
    """
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    problems = []
    for node in nodes:
        if node.op_type != "Attention":
            continue
        name = node.name or "(unnamed)"
        inputs = list(node.input) + [""] * (7 - len(node.input))
        if inputs[4] or inputs[5]:
            problems.append(f"Attention node '{name}' takes past_key/past_value inputs; TensorRT needs the static "
                            "cache form (TensorScatter into the cache, then a single-output Attention over it)")
        if any(node.output[1:]):
            problems.append(f"Attention node '{name}' has {sum(1 for o in node.output if o)} outputs "
                            f"({', '.join(o for o in node.output if o)}); TensorRT takes only the first")
        if inputs[6]:
            problems.append(f"Attention node '{name}' uses nonpad_kv_seqlen, which the TensorRT parser ignores; "
                            "use an explicit boolean mask")
        if any(a.name == "is_causal" and a.i for a in node.attribute):
            problems.append(f"Attention node '{name}' sets is_causal=1, which TensorRT aligns top-left (wrong for "
                            "decode); use an explicit boolean mask")
    return problems


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node()} '{e.node_name()}' ({e.node_operator()})" if e.node() >= 0 else "graph"
        errors.append(f"{where}: {e.desc()}")
    return errors


def _profiles(spec: GraphSpec, prefill_max_seq: int) -> list[dict]:
    """min/opt/max shapes per input for the prefill and decode profiles; caches are static except in batch."""
    cache = spec.cache_shape_per_row
    profiles = []
    for name, max_seq in ((PREFILL, prefill_max_seq), (DECODE, 1)):
        opt_seq = min(PREFILL_OPT_SEQ, max_seq)
        shapes = {INPUT_IDS: {"min": [1, 1], "opt": [spec.max_batch, opt_seq], "max": [spec.max_batch, max_seq]}}
        for vector in (WRITE_INDICES, LOGITS_INDICES):
            shapes[vector] = {"min": [1], "opt": [spec.max_batch], "max": [spec.max_batch]}
        # The engine always attends over every slot (one decode shape, so one CUDA graph); see engines/base.py.
        shapes[KV_SLOTS] = {"min": [spec.max_context]} | {k: [spec.max_context] for k in ("opt", "max")}
        for layer in range(spec.num_layers):
            for cache_name in past_names(layer):
                shapes[cache_name] = {"min": [1, *cache], "opt": [spec.max_batch, *cache],
                                      "max": [spec.max_batch, *cache]}
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def _check_network_io(trt, network, spec: GraphSpec) -> None:
    """The parsed network must have exactly the manifest's IO, with caches static in all dims but batch."""
    io = spec.io()
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    if set(inputs) != set(io["inputs"]) or set(outputs) != set(io["outputs"]):
        raise EngineError(f"the ONNX graph's inputs {sorted(inputs)} / outputs {sorted(outputs)} differ from the "
                          f"GraphSpec's {sorted(io['inputs'])} / {sorted(io['outputs'])}")
    expected = (-1, *spec.cache_shape_per_row)
    dtype = {"float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT}[spec.dtype]
    for layer in range(spec.num_layers):
        for name in past_names(layer):
            shape = tuple(inputs[name].shape)
            if shape != expected:
                raise EngineError(f"input {name} has shape {shape}; TensorRT's KV-cache update needs {expected} "
                                  "(only the batch dimension dynamic)")
            if inputs[name].dtype != dtype:
                raise EngineError(f"input {name} is {inputs[name].dtype.name}; the GraphSpec says {spec.dtype}")


def _native_layer_counts(network) -> Counter:
    counts = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    # One IAttention shows up as an ATTENTION_INPUT and an ATTENTION_OUTPUT boundary layer (IAttentionInputLayer /
    # IAttentionOutputLayer in TensorRT 10.15+, 11 and TRT-RTX alike); the output layers count the attentions.
    counts["ATTENTION"] = counts["ATTENTION_OUTPUT"]
    return counts


def _check_native_layers(counts: Counter, onnx_ops: Counter, spec: GraphSpec) -> None:
    """Every cache update, RoPE, attention and LayerNorm must be one native layer, in the per-layer count."""
    problems = []
    for op, (layer_type, per_layer) in NATIVE_OPS.items():
        if counts[layer_type] != onnx_ops[op]:
            problems.append(f"{onnx_ops[op]} ONNX {op} nodes became {counts[layer_type]} {layer_type} layers "
                            "(the rest fell back to generic layers)")
        # LayerNorm: one per block plus the final norm, plus qk-norm where the model has it.
        expected_ok = (counts[layer_type] >= per_layer * spec.num_layers + 1 if op == "LayerNormalization"
                       else counts[layer_type] == per_layer * spec.num_layers)
        if not expected_ok:
            problems.append(f"{counts[layer_type]} {layer_type} layers for {spec.num_layers} decoder layers; "
                            f"expected {per_layer} per decoder layer")
    if problems:
        raise EngineError("the network is not in the native form TensorRT needs: " + "; ".join(problems))


def _mark_attention_decomposable(trt, network) -> int:
    """Let each IAttention split into several kernels where no fused kernel fits, instead of failing the build."""
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer  # the Python bindings return a plain ILayer
            layer.attention.decomposable = True
            marked += 1
    return marked


def _compute_capability_targets(config) -> list[str] | str | None:
    """What an offline TRT-RTX build targets; None for the full TensorRT (it builds for the GPU it runs on)."""
    if not hasattr(config, "num_compute_capabilities"):
        return None
    if config.num_compute_capabilities == 0:
        return ("none set: TensorRT-RTX's portable default (Ampere and later per its docs, not Turing; its "
                "ComputeCapability enum has no SM90, so not H100)")
    return [config.get_compute_capability(i).name for i in range(config.num_compute_capabilities)]


def build_plan(onnx_path: Path, spec: GraphSpec, out_dir: Path, prefill_max_seq: int | None = None,
               decomposable_attention: bool | None = None) -> TensorRTPlan:
    """Parse ``onnx_path`` into a strongly typed network, build a plan with a prefill and a decode profile, and
    write ``model.plan``, ``timing.cache`` (full TensorRT only) and ``tensorrt_build.log`` into ``out_dir``.
    Returns what the manifest records of the plan.

    ``decomposable_attention`` lets each attention run as several kernels where TensorRT has no fused one; it
    defaults to on for fp32 (no fused fp32 kernel exists) and off for fp16, where needing it is reported as an
    error rather than silently building a slower engine.
    """
    trt = _import_trt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    prefill_max_seq = spec.max_context if prefill_max_seq is None else prefill_max_seq
    if not 1 <= prefill_max_seq <= spec.max_context:
        raise EngineError(f"prefill_max_seq {prefill_max_seq} must lie in [1, max_context={spec.max_context}]")
    if spec.dtype not in ("float16", "float32"):
        raise EngineError(f"GraphSpec dtype {spec.dtype!r}: TensorRT plans are built for float16 or float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger = _make_logger(trt)
    try:
        log.info("tensorrt: checking the ONNX graph form of %s", onnx_path)
        model = onnx.load(str(onnx_path), load_external_data=False)
        onnx_ops = Counter(n.op_type for n in model.graph.node)
        refused = unsupported_graph_forms(model)

        log.info("tensorrt: parsing %s with %s %s", onnx_path.name, trt.__name__, trt.__version__)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        parsed = parser.parse_from_file(str(onnx_path))  # a path, so model.onnx.data is found beside it
        errors = _parser_errors(parser)
        if refused or not parsed or errors:
            parts = [f"TensorRT cannot take {onnx_path}:"] + [f"  - {p}" for p in refused]
            parts += [f"  - parser: {e}" for e in errors]
            if not parsed and not errors:
                parts.append("  - parser: failed without an error message")
            raise EngineError("\n".join(parts))
        _check_network_io(trt, network, spec)

        counts = _native_layer_counts(network)
        _check_native_layers(counts, onnx_ops, spec)
        decomposable = spec.dtype == "float32" if decomposable_attention is None else decomposable_attention
        if decomposable:
            marked = _mark_attention_decomposable(trt, network)
            log.info("tensorrt: marked %d attention layers decomposable", marked)

        config = builder.create_builder_config()
        profiles = _profiles(spec, prefill_max_seq)
        for profile_spec in profiles:
            profile = builder.create_optimization_profile()
            for name, s in profile_spec["shapes"].items():
                profile.set_shape(name, s["min"], s["opt"], s["max"])
            config.add_optimization_profile(profile)
        # A timing cache from an earlier build of the same folder skips re-timing the same kernels. TRT-RTX does
        # not time kernels at build time (its timing-cache calls are deprecated no-ops), so it gets none.
        cache_path = out_dir / TIMING_CACHE_FILE if trt.__name__ == "tensorrt" else None
        if cache_path is not None:
            timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
            config.set_timing_cache(timing_cache, ignore_mismatch=False)

        log.info("tensorrt: building the plan (%d layers; native %s; profiles %s)", network.num_layers,
                 {t: counts[t] for t in NATIVE_LAYER_TYPES}, [p["name"] for p in profiles])
        build_start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - build_start
        if plan is None:
            reason = "; ".join(logger.errors) or f"no error logged, see {out_dir / BUILD_LOG_FILE}"
            if "not supported by a dedicated kernel" in reason and not decomposable:
                # Measured with TRT-RTX 1.7.1: fp16 graphs with fewer than 4 query heads have no fused kernel.
                raise EngineError(f"TensorRT has no fused attention kernel for the attention shape in {onnx_path} "
                                  "(TRT-RTX 1.7.1 needs at least 4 query heads in fp16); pass "
                                  "decomposable_attention=True to build a slower multi-kernel attention. "
                                  f"TensorRT said: {reason}")
            raise EngineError(f"TensorRT failed to build a plan from {onnx_path}: {reason}")
        plan_bytes = bytes(plan)
        (out_dir / PLAN_FILE).write_bytes(plan_bytes)
        if cache_path is not None:
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        log.info("tensorrt: wrote %s (%.1f MB) in %.1f s", out_dir / PLAN_FILE, len(plan_bytes) / 1e6,
                 time.perf_counter() - start)
    finally:
        (out_dir / BUILD_LOG_FILE).write_text("\n".join(logger.lines) + "\n")

    return TensorRTPlan(
        module=trt.__name__,
        version=trt.__version__,
        gpu=_gpu(),
        compute_capability_targets=_compute_capability_targets(config),
        profiles=profiles,
        native_layers={t: counts[t] for t in NATIVE_LAYER_TYPES},
        attention_decomposable=decomposable,
        plan_file=PLAN_FILE,
        plan_sha256=hashlib.sha256(plan_bytes).hexdigest(),
        build_log_file=BUILD_LOG_FILE,
        timing_cache_file=cache_path and cache_path.name,
        build_seconds=round(build_seconds, 3),
    )


# ----------------------------------------------------------------------------------------------------- running


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

    TensorRT plans are tied to the exact TensorRT version and (for the full TensorRT) to the GPU's compute
    capability; deserialising a foreign plan fails deep inside TensorRT, or worse, so check first.
    """
    if plan.module != module or plan.version != version:
        return (f"the plan was built by {plan.module} {plan.version} but this is {module} "
                f"{version}; rebuild the TensorRT artifact here")
    built_on = plan.gpu
    if built_on is None:
        return "the plan was built without a GPU (an offline TensorRT-RTX build); rebuild it on this GPU"
    if gpu is None or built_on.get("compute_capability") != gpu["compute_capability"]:
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

    return plan_mismatch(plan, trt.__name__, trt.__version__, _gpu())


class TensorRTState:
    """One batch's KV caches on the GPU, its fixed decode IO buffers and its captured decode CUDA graph."""

    def __init__(self, batch: int, caches: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor,
                 decode_inputs: dict[str, torch.Tensor]):
        self.batch = batch
        self.caches = caches
        self.logits = logits
        self.decode_inputs = decode_inputs  # fixed addresses, so a captured graph can be replayed
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode graphs by number of rows stepped


class TensorRTEngine(Engine):
    """Runs ``model.plan`` with ``execute_async_v3``; decode steps replay a CUDA graph once captured."""

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
        mismatch = plan_mismatch(section, trt.__name__, trt.__version__, _gpu())
        if mismatch:
            raise EngineError(f"{plan_path}: {mismatch}")
        plan = plan_path.read_bytes()
        if hashlib.sha256(plan).hexdigest() != section.plan_sha256:
            raise EngineError(f"{plan_path}: sha256 differs from the manifest's plan_sha256; the file was changed "
                              "or truncated, rebuild the artifact")

        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialise {plan_path}: " + "; ".join(self._logger.errors))
        self._check_engine_io(plan_path)
        names = [p["name"] for p in section.profiles]
        if names != [PREFILL, DECODE] or self._engine.num_optimization_profiles != 2:
            raise EngineError(f"{plan_path}: expected profiles [{PREFILL}, {DECODE}], the manifest lists {names} "
                              f"and the plan has {self._engine.num_optimization_profiles}")

        self._prefill_max_seq = section.profiles[0]["shapes"][INPUT_IDS]["max"][1]
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan_path} (out of GPU "
                              "memory?): " + "; ".join(self._logger.errors))
        self._stream = torch.cuda.Stream(self.device)
        self._profile: int | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._use_cuda_graphs = use_cuda_graphs
        self.last_step_used_graph = False  # for tests and benchmarks: did the last step replay a graph?

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

    def allocate(self, batch: int) -> TensorRTState:
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

    def _bind(self, profile: int, inputs: dict[str, torch.Tensor], state: TensorRTState, rows: int) -> bool:
        """Point the context at these tensors (the first ``rows`` rows of the state's caches, a contiguous prefix
        of each buffer); calls TensorRT only for what changed. True if anything did."""
        changed = False
        stream = self._stream.cuda_stream
        if self._profile != profile:
            if not self._context.set_optimization_profile_async(profile, stream):
                raise EngineError(f"TensorRT refused optimisation profile {profile}: "
                                  + "; ".join(self._logger.errors))
            # Shapes belong to a profile; bind everything again after a switch.
            self._profile, self._shapes, self._addresses, changed = profile, {}, {}, True
        input_tensors, output_tensors = dict(inputs), {LOGITS: state.logits[:rows]}
        for layer, (k, v) in enumerate(state.caches):
            for past, present, cache in zip(past_names(layer), present_names(layer), (k, v)):
                input_tensors[past] = output_tensors[present] = cache[:rows]  # in place: one buffer for both
        for name, tensor in input_tensors.items():
            shape = tuple(tensor.shape)
            if self._shapes.get(name) != shape:
                if not self._context.set_input_shape(name, shape):
                    raise EngineError(f"TensorRT refused shape {shape} for input {name} under profile {profile}")
                self._shapes[name] = shape
                changed = True
        for name, tensor in {**input_tensors, **output_tensors}.items():
            if self._addresses.get(name) != tensor.data_ptr():
                if not self._context.set_tensor_address(name, tensor.data_ptr()):
                    raise EngineError(f"TensorRT refused the device address of {name}")
                self._addresses[name] = tensor.data_ptr()
                changed = True
        return changed

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed: " + "; ".join(self._logger.errors[-5:]))

    def _capture(self, state: TensorRTState, rows: int) -> None:
        """Record the decode step of this state over ``rows`` rows in a CUDA graph; on failure, run eagerly."""
        if hasattr(self._context, "is_stream_capturable") and not self._context.is_stream_capturable(
                self._stream.cuda_stream):
            log.warning("tensorrt: this execution context cannot be captured in a CUDA graph; decoding eagerly")
            self._use_cuda_graphs = False
            return
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: only this thread must avoid capture-unsafe CUDA calls; TensorRT's own helper threads
            # may make them without invalidating the capture.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._execute()
        except (RuntimeError, EngineError) as e:
            log.warning("tensorrt: CUDA graph capture of the decode step failed (%s); decoding eagerly", e)
            self._use_cuda_graphs = False
            return
        state.graphs[rows] = graph

    def _step(self, state: TensorRTState, input_ids: np.ndarray, write_indices: np.ndarray,
             logits_indices: np.ndarray) -> np.ndarray:
        rows, decode = input_ids.shape[0], input_ids.shape[1] == 1
        if input_ids.shape[1] > self._prefill_max_seq:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens per row; the plan's prefill profile takes "
                             f"at most {self._prefill_max_seq} (prefill longer prompts in chunks)")
        host = {INPUT_IDS: input_ids, WRITE_INDICES: write_indices, LOGITS_INDICES: logits_indices}
        self.last_step_used_graph = False
        with torch.cuda.stream(self._stream):
            if decode:
                inputs = {name: buffer[:rows] if name != KV_SLOTS else buffer
                          for name, buffer in state.decode_inputs.items()}
                for name, array in host.items():
                    inputs[name].copy_(torch.from_numpy(array))
            else:
                inputs = {name: torch.from_numpy(array).to(self.device) for name, array in host.items()}
                inputs[KV_SLOTS] = state.decode_inputs[KV_SLOTS]  # the same all-slots range as decode
            changed = self._bind(1 if decode else 0, inputs, state, rows)
            if decode and self._use_cuda_graphs and not changed:
                # TensorRT needs one eager enqueue after any shape/address/profile change before capture or
                # replay is valid, which the `changed` step before this one did.
                if rows not in state.graphs:
                    self._capture(state, rows)
                if rows in state.graphs:
                    state.graphs[rows].replay()
                    self.last_step_used_graph = True
            if not self.last_step_used_graph:
                self._execute()
            logits = state.logits[:rows].cpu()  # waits for the stream
        return logits.numpy()

    def read_cache(self, state: TensorRTState) -> list[tuple[np.ndarray, np.ndarray]]:
        self._stream.synchronize()
        return [(k.cpu().numpy(), v.cpu().numpy()) for k, v in state.caches]

"""Build an fp16 (or fp32) TensorRT plan from the exported ONNX graph; ``engines.tensorrt`` runs it.

Building and running are separate modules, as Polygraphy separates loaders from runners: building needs only the
ONNX parser and builder, which the full ``tensorrt`` module gives on a GPU machine and ``tensorrt_rtx`` gives
anywhere, CPU included (its plans are portable across RTX-class GPUs, not H100). Running needs the full
``tensorrt`` module and a CUDA GPU.

The graph form: per layer, two ``TensorScatter`` become ``KV_CACHE_UPDATE``
layers that update a static ``[batch, kv_heads, max_context, head_dim]`` cache in place, so each ``present_*``
output is bound to the same device address as its ``past_*`` input.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from pathlib import Path

import onnx

from engines.artifact import TensorRTPlan
from engines.base import INPUT_IDS, KV_SLOTS, LOGITS_INDICES, WRITE_INDICES, EngineError, GraphSpec, past_names
from engines.tensorrt import DECODE, PREFILL, gpu_description, make_logger

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
BUILD_LOG_FILE = "tensorrt_build.log"
PREFILL_OPT_SEQ = 512  # the prompt length the prefill profile's kernels are tuned for (clamped to its max)

# ONNX op -> the native TensorRT layer it must become, and how many each decoder layer has. Anything else means
# the parser decomposed the op into generic layers: slower, and for the cache, no in-place update.
NATIVE_OPS = {"TensorScatter": ("KV_CACHE_UPDATE", 2), "RotaryEmbedding": ("ROTARY_EMBEDDING", 2),
              "Attention": ("ATTENTION", 1), "LayerNormalization": ("NORMALIZATION", 1)}
NATIVE_LAYER_TYPES = [layer_type for layer_type, _ in NATIVE_OPS.values()]


def import_builder():
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



def unsupported_graph_forms(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT cannot take (or would silently miscompute) this graph; empty when the form is fine.

    Measured with the TensorRT-RTX 1.7.1 parser: it rejects Attention with past/present tensors or several outputs,
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
    """min/opt/max shapes per input for the prefill and decode profiles; caches are static except in batch,
    ``kv_slots`` ranges over [1, max_context]."""
    cache = spec.cache_shape_per_row
    profiles = []
    for name, max_seq in ((PREFILL, prefill_max_seq), (DECODE, 1)):
        opt_seq = min(PREFILL_OPT_SEQ, max_seq)
        shapes = {INPUT_IDS: {"min": [1, 1], "opt": [spec.max_batch, opt_seq], "max": [spec.max_batch, max_seq]}}
        for vector in (WRITE_INDICES, LOGITS_INDICES):
            shapes[vector] = {"min": [1], "opt": [spec.max_batch], "max": [spec.max_batch]}
        # Any slot count: prefill reads its filled prefix, decode a bucket of engines.tensorrt.kv_buckets (one CUDA
        # graph per bucket). Kernels are tuned for the longest context, where a step costs most.
        shapes[KV_SLOTS] = {"min": [1], "opt": [spec.max_context], "max": [spec.max_context]}
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


def builder_config(trt, builder, spec: GraphSpec, profiles: list[dict]):
    """The builder config: the optimisation profiles, and for fp32 graphs no TF32.

    TensorRT enables ``BuilderFlag.TF32`` by default: fp32 matrix products then round their inputs to 10-bit
    mantissas, which moves the logits of an fp32 plan by about 1.7e-3, past the 1e-4 fp32 parity tolerance.
    In an fp16 graph only the fp32 islands (norm statistics, logits) are fp32, so the default stays.
    """
    config = builder.create_builder_config()
    if spec.dtype == "float32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for profile_spec in profiles:
        profile = builder.create_optimization_profile()
        for name, shape in profile_spec["shapes"].items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)
    return config


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
    trt = import_builder()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    prefill_max_seq = spec.max_context if prefill_max_seq is None else prefill_max_seq
    if not 1 <= prefill_max_seq <= spec.max_context:
        raise EngineError(f"prefill_max_seq {prefill_max_seq} must lie in [1, max_context={spec.max_context}]")
    if spec.dtype not in ("float16", "float32"):
        raise EngineError(f"GraphSpec dtype {spec.dtype!r}: TensorRT plans are built for float16 or float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger = make_logger(trt)
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

        profiles = _profiles(spec, prefill_max_seq)
        config = builder_config(trt, builder, spec, profiles)
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
            if "attention" in reason.lower() and not decomposable:
                # TRT-RTX 1.7.1 says "... not supported by a dedicated kernel" for fp16 graphs with fewer than 4
                # query heads (measured); the full TensorRT words it its own way, so match only the layer kind.
                raise EngineError(f"TensorRT found no fused attention kernel for the attention shape in {onnx_path} "
                                  "(TRT-RTX 1.7.1 has none below 4 query heads in fp16); pass "
                                  "decomposable_attention=True to build a slower multi-kernel attention. "
                                  f"TensorRT said: {reason}")
            raise EngineError(f"TensorRT failed to build a plan from {onnx_path}: {reason}")
        # IHostMemory exposes its bytes through the buffer protocol: write and hash them in place, no host copy
        # (a plan is as large as the weights). Its memoryview's item format follows its dtype, hence cast("B").
        plan_view = memoryview(plan).cast("B")
        (out_dir / PLAN_FILE).write_bytes(plan_view)
        plan_sha256 = hashlib.sha256(plan_view).hexdigest()
        if cache_path is not None:
            cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()).cast("B"))
        log.info("tensorrt: wrote %s (%.1f MB) in %.1f s", out_dir / PLAN_FILE, plan_view.nbytes / 1e6,
                 time.perf_counter() - start)
    finally:
        (out_dir / BUILD_LOG_FILE).write_text("\n".join(logger.lines) + "\n")

    return TensorRTPlan(
        module=trt.__name__,
        version=trt.__version__,
        gpu=gpu_description(),
        compute_capability_targets=_compute_capability_targets(config),
        profiles=profiles,
        native_layers={t: counts[t] for t in NATIVE_LAYER_TYPES},
        attention_decomposable=decomposable,
        plan_file=PLAN_FILE,
        plan_sha256=plan_sha256,
        build_log_file=BUILD_LOG_FILE,
        timing_cache_file=cache_path and cache_path.name,
        build_seconds=round(build_seconds, 3),
    )

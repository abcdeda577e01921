"""TensorRT: the CPU build gate (TensorRT-RTX's parser + builder) and the GPU runtime checks; also the GPU-facing
settings of the ONNX Runtime engine (CUDA provider options, close()).

The CPU gate runs wherever ``tensorrt`` or ``tensorrt_rtx`` imports: every exported graph must parse with zero
errors, map each cache update / RoPE / attention / LayerNorm to one native layer, and build with a prefill and a
decode profile. The GPU tests need the full ``tensorrt`` and a CUDA device; elsewhere they are skipped with the
reason ``runtime_available()`` gives. Run ``pytest --log-cli-level=INFO`` to see build and step timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from packaging.requirements import Requirement

from engines.artifact import TensorRTPlan
from engines.base import EngineError, GraphSpec
from engines.onnxruntime import OnnxRuntimeEngine, execution_providers
from engines.tensorrt import (TensorRTEngine, kv_bucket, kv_buckets, kv_slots_profile_problem, plan_mismatch,
                              runtime_available)
from engines.tensorrt_build import PLAN_FILE, build_plan, builder_config, import_builder, unsupported_graph_forms
from export.onnx_graph import export_onnx
from export.parity import TOLERANCES
from reference.checkpoint import tiny_model
from reference.config import CohereConfig
from reference.model import CohereForCausalLM
from reference.presets import PRESETS

log = logging.getLogger(__name__)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


HAS_BUILDER = _importable("tensorrt") or _importable("tensorrt_rtx")
BUILDER_MODULE = import_builder().__name__ if HAS_BUILDER else None  # the full TensorRT wins where installed
needs_builder = pytest.mark.skipif(not HAS_BUILDER, reason="neither tensorrt nor tensorrt_rtx is installed, so "
                                                           "there is no TensorRT ONNX parser/builder to gate with")
RUNTIME_OK, RUNTIME_WHY = runtime_available()
needs_runtime = pytest.mark.skipif(not RUNTIME_OK, reason=f"cannot run TensorRT engines here: {RUNTIME_WHY}")


def _random_config(**kw) -> CohereConfig:
    base = dict(vocab_size=256, intermediate_size=256, num_hidden_layers=2, rope_theta=10_000.0,
                logit_scale=0.0625, use_qk_norm=False, tie_word_embeddings=True)
    return CohereConfig(**{**base, **kw})


# Small random-weight configs that each stress one shape of the graph; tiny is the preset (GQA + qk-norm).
CONFIGS = {
    "tiny": PRESETS["tiny"].config,
    "mha_head_dim_128": _random_config(hidden_size=512, num_attention_heads=4, num_key_value_heads=4),
    "gqa_no_qk_norm_untied": _random_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                            tie_word_embeddings=False),
    "odd_heads_3_kv_1": _random_config(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                                       num_hidden_layers=3, use_qk_norm=True),
}


def _model(name: str, config: CohereConfig, dtype: torch.dtype) -> CohereForCausalLM:
    if name == "tiny":
        return tiny_model(config).to(dtype)
    torch.manual_seed(0)
    return CohereForCausalLM(config).to(dtype)


def _spec(config: CohereConfig, dtype: str, max_batch: int, max_context: int) -> GraphSpec:
    return GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=max_batch,
                     max_context=max_context, dtype=dtype)


def _export(folder: Path, name: str, dtype: str = "float16", max_batch: int = 4,
            max_context: int = 128) -> tuple[GraphSpec, Path]:
    config = CONFIGS[name]
    spec = _spec(config, dtype, max_batch, max_context)
    return spec, export_onnx(_model(name, config, getattr(torch, dtype)), spec, folder)


def _export_and_build(folder: Path, name: str, dtype: str = "float16", max_batch: int = 4,
                      max_context: int = 128) -> tuple[GraphSpec, dict]:
    spec, onnx_path = _export(folder, name, dtype, max_batch, max_context)
    section = build_plan(onnx_path, spec, folder)
    log.info("%s %s: built in %.2f s, native layers %s", name, dtype, section.build_seconds,
             section.native_layers)
    return spec, section


# ------------------------------------------------------------------------------------------- CPU build gate


def _expected_native_layers(config: CohereConfig) -> dict:
    # Per decoder layer: key + value cache updates, RoPE on q and k, one attention, the block norm (+ q and k
    # norms with qk-norm); plus the final norm.
    layers = config.num_hidden_layers
    return {"KV_CACHE_UPDATE": 2 * layers, "ROTARY_EMBEDDING": 2 * layers, "ATTENTION": layers,
            "NORMALIZATION": layers * (3 if config.use_qk_norm else 1) + 1}


@needs_builder
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "odd_heads_3_kv_1"])
def test_fp16_graph_builds_with_native_layers(tmp_path, name):
    config = CONFIGS[name]
    spec, section = _export_and_build(tmp_path, name)
    assert section.native_layers == _expected_native_layers(config)
    assert [p["name"] for p in section.profiles] == ["prefill", "decode"]
    prefill, decode = (p["shapes"] for p in section.profiles)
    assert prefill["input_ids"] == {"min": [1, 1], "opt": [4, 128], "max": [4, 128]}
    assert decode["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}
    cache = [config.num_key_value_heads, 128, config.head_dim]
    assert decode["past_value_0"] == {"min": [1, *cache], "opt": [4, *cache], "max": [4, *cache]}
    assert prefill["kv_slots"] == decode["kv_slots"] == {"min": [1], "opt": [128], "max": [128]}
    assert section.attention_decomposable is False
    plan = (tmp_path / section.plan_file).read_bytes()
    assert plan, "the plan file is empty"
    assert hashlib.sha256(plan).hexdigest() == section.plan_sha256
    if section.module == "tensorrt":  # TRT-RTX does not time kernels at build time: no timing cache
        assert (tmp_path / section.timing_cache_file).stat().st_size > 0
    build_log = (tmp_path / section.build_log_file).read_text()
    assert "[ERROR]" not in build_log and "[INTERNAL_ERROR]" not in build_log


@needs_builder
def test_fewer_than_four_heads_need_decomposable_attention(tmp_path):
    """TRT-RTX 1.7.1 has no fused fp16 attention kernel below 4 query heads (measured: 1, 2, 3 fail; 4-8 build):
    the default build says so. The full TensorRT has its own kernel set (not measured here): its default build
    may succeed, and if it fails for want of a kernel it must say the same. Either way an explicit decomposable
    build maps every op to its native layer."""
    spec, onnx_path = _export(tmp_path, "odd_heads_3_kv_1")
    if BUILDER_MODULE == "tensorrt_rtx":
        with pytest.raises(EngineError, match="no fused attention kernel.*decomposable_attention=True"):
            build_plan(onnx_path, spec, tmp_path)
    else:
        try:
            default = build_plan(onnx_path, spec, tmp_path)
        except EngineError as e:
            assert "decomposable_attention=True" in str(e), str(e)
        else:
            assert default.attention_decomposable is False
            assert default.native_layers == _expected_native_layers(CONFIGS["odd_heads_3_kv_1"])
    section = build_plan(onnx_path, spec, tmp_path, decomposable_attention=True)
    assert section.attention_decomposable is True
    assert section.native_layers == _expected_native_layers(CONFIGS["odd_heads_3_kv_1"])
    assert hashlib.sha256((tmp_path / PLAN_FILE).read_bytes()).hexdigest() == section.plan_sha256


@needs_builder
def test_plan_profiles_take_every_decode_bucket(tmp_path):
    """Decode attends over a bucket of cache slots (256, 512, 1024 here), prefill over its filled prefix: both
    profiles must take kv_slots from 1 to max_context, and TensorRT must build the plan with that range. Whether
    the built engine accepts each shape is checked on a GPU (set_input_shape in the GPU tests below): TRT-RTX
    cannot deserialise a plan without a CUDA driver."""
    spec, section = _export_and_build(tmp_path, "tiny", max_batch=2, max_context=1024)
    assert kv_buckets(spec.max_context) == [256, 512, 1024]
    assert kv_slots_profile_problem(section, spec.max_context) is None
    for profile in section.profiles:
        declared = profile["shapes"]["kv_slots"]
        for slots in [1, 100, *kv_buckets(spec.max_context)]:
            assert declared["min"][0] <= slots <= declared["max"][0], (profile["name"], slots, declared)
    assert hashlib.sha256((tmp_path / PLAN_FILE).read_bytes()).hexdigest() == section.plan_sha256
    build_log = (tmp_path / section.build_log_file).read_text()
    assert "[ERROR]" not in build_log and "[INTERNAL_ERROR]" not in build_log


def test_kv_buckets_are_powers_of_two_from_256_then_max_context():
    assert kv_buckets(8192) == [2 ** k for k in range(8, 14)]
    assert kv_buckets(6000) == [256, 512, 1024, 2048, 4096, 6000]
    assert kv_buckets(4097) == [256, 512, 1024, 2048, 4096, 4097]
    assert kv_buckets(256) == [256]
    assert kv_buckets(64) == [64]  # below the smallest bucket: max_context alone


@pytest.mark.parametrize("max_context", [64, 256, 1000, 8192])
def test_kv_bucket_is_the_smallest_covering_the_longest_row(max_context):
    buckets = kv_buckets(max_context)
    rng = np.random.default_rng(max_context)
    for seq in (1, 7):
        for _ in range(200):
            rows = int(rng.integers(1, 5))
            write_indices = rng.integers(0, max_context - seq + 1, size=rows)
            bucket = kv_bucket(buckets, write_indices, seq)
            longest = max(int(w) + seq for w in write_indices)  # every row's context after the step
            assert bucket >= longest and bucket in buckets
            assert all(b < longest for b in buckets if b < bucket), (write_indices, seq, bucket)
    # Exactly at a boundary the bucket fits; one past it the next one is taken; the last row decides.
    assert kv_bucket(kv_buckets(8192), np.array([255]), 1) == 256
    assert kv_bucket(kv_buckets(8192), np.array([256]), 1) == 512
    assert kv_bucket(kv_buckets(8192), np.array([3, 900, 10]), 1) == 1024
    assert kv_bucket(kv_buckets(8192), np.array([8191]), 1) == 8192
    with pytest.raises(ValueError, match="needs 8193 cache slots"):
        kv_bucket(kv_buckets(8192), np.array([8192]), 1)


def test_plans_without_the_kv_slots_range_are_refused():
    """A plan built when decode attended over every slot takes kv_slots = max_context only: refused, with why."""
    only_max = {"min": [1024], "opt": [1024], "max": [1024]}
    old = _plan(module="tensorrt", version="10.15.1", gpu=None,
                profiles=[{"name": "prefill", "shapes": {"kv_slots": only_max}},
                          {"name": "decode", "shapes": {"kv_slots": only_max}}])
    assert "prefill profile takes kv_slots [1024, 1024]" in kv_slots_profile_problem(old, 1024)
    assert "rebuild the TensorRT artifact" in kv_slots_profile_problem(old, 1024)
    ranged = dataclasses.replace(old, profiles=[{"name": n, "shapes": {"kv_slots": {"min": [1], "opt": [1024],
                                                                                    "max": [1024]}}}
                                                for n in ("prefill", "decode")])
    assert kv_slots_profile_problem(ranged, 1024) is None
    assert "[1, 2048]" in kv_slots_profile_problem(ranged, 2048)


@needs_builder
def test_prefill_max_seq_bounds_the_prefill_profile(tmp_path):
    config = CONFIGS["tiny"]
    spec = _spec(config, "float16", max_batch=2, max_context=64)
    onnx_path = export_onnx(_model("tiny", config, torch.float16), spec, tmp_path)
    section = build_plan(onnx_path, spec, tmp_path, prefill_max_seq=16)
    assert section.profiles[0]["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [2, 16]}
    with pytest.raises(EngineError, match="prefill_max_seq 65"):
        build_plan(onnx_path, spec, tmp_path, prefill_max_seq=65)


@needs_builder
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp32_plans_are_built_without_tf32(dtype):
    """TensorRT's TF32 default moves fp32 logits by ~1.7e-3, past the fp32 tolerance: fp32 builds clear it; fp16
    builds keep the default. Checked on the builder config of whichever TensorRT is installed (CPU for TRT-RTX)."""
    trt = import_builder()
    builder = trt.Builder(trt.Logger())
    assert builder.create_builder_config().get_flag(trt.BuilderFlag.TF32), "TF32 is no longer TensorRT's default"
    spec = GraphSpec(num_layers=1, num_kv_heads=1, head_dim=8, vocab_size=16, max_batch=1, max_context=8,
                     dtype=dtype)
    config = builder_config(trt, builder, spec, profiles=[])
    assert config.get_flag(trt.BuilderFlag.TF32) == (dtype == "float16")


def test_onnxruntime_cuda_provider_runs_fp32_without_tf32():
    """The CUDA execution provider's use_tf32 defaults to on; fp32 sessions turn it off, fp16 ones keep defaults."""
    assert execution_providers("cuda", "float32") == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                     "CPUExecutionProvider"]
    assert execution_providers("cuda", "float16") == [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    assert execution_providers("cpu", "float32") == ["CPUExecutionProvider"]


def test_onnxruntime_engine_close_drops_the_session(tmp_path):
    spec, onnx_path = _export(tmp_path, "tiny", dtype="float32", max_batch=1, max_context=16)
    with OnnxRuntimeEngine(onnx_path, spec, device="cpu") as engine:
        state = engine.allocate(1)
        logits = engine.step(state, np.array([[13, 14]]), np.zeros(1, np.int64), np.array([1]))
        assert logits.shape == (1, spec.vocab_size)
    assert engine.session is None
    with pytest.raises(EngineError, match="closed"):
        engine.step(state, np.array([[15]]), np.array([2]), np.zeros(1, np.int64))


def test_gpu_extra_declares_the_tensorrt_it_is_written_for():
    """engines/ is written against TensorRT 10.15 to 11.x; nothing imports cuda-python (CUDA comes from torch)."""
    tomllib = pytest.importorskip("tomllib")
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        extra = [Requirement(r) for r in tomllib.load(f)["project"]["optional-dependencies"]["gpu"]]
    tensorrt = next(r for r in extra if r.name == "tensorrt")
    assert [v for v in ("10.14.1", "10.15.1", "11.4.1", "12.0.0") if tensorrt.specifier.contains(v)] == [
        "10.15.1", "11.4.1"]
    assert "cuda-python" not in {r.name for r in extra}


@needs_builder
def test_fp32_graph_builds_with_decomposable_attention(tmp_path):
    spec, section = _export_and_build(tmp_path, "tiny", dtype="float32", max_batch=2, max_context=64)
    assert section.attention_decomposable is True
    assert section.native_layers["ATTENTION"] == spec.num_layers
    assert (tmp_path / PLAN_FILE).stat().st_size > 0


def _attention_with_past(path: Path) -> Path:
    """One opset-24 Attention in the form ONNX Runtime likes and TensorRT rejects: past in, present out."""
    f16 = TensorProto.FLOAT16
    value = lambda name, shape: helper.make_tensor_value_info(name, f16, shape)  # noqa: E731
    node = helper.make_node("Attention", ["q", "k", "v", "", "past_key", "past_value"],
                            ["y", "present_key", "present_value"], name="attn_with_past")
    graph = helper.make_graph(
        [node], "attention_with_past",
        [value("q", [1, 2, 4, 8]), value("k", [1, 2, 4, 8]), value("v", [1, 2, 4, 8]),
         value("past_key", [1, 2, 3, 8]), value("past_value", [1, 2, 3, 8])],
        [value("y", [1, 2, 4, 8]), value("present_key", [1, 2, 7, 8]), value("present_value", [1, 2, 7, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@needs_builder
def test_attention_with_past_inputs_is_refused(tmp_path):
    onnx_path = _attention_with_past(tmp_path / "model.onnx")
    spec = GraphSpec(num_layers=1, num_kv_heads=2, head_dim=8, vocab_size=16, max_batch=1, max_context=8,
                     dtype="float16")
    with pytest.raises(EngineError) as refused:
        build_plan(onnx_path, spec, tmp_path / "out")
    message = str(refused.value)
    assert "'attn_with_past' takes past_key/past_value inputs" in message
    assert "has 3 outputs" in message
    assert "parser:" in message and "one output" in message  # the parser's own words come along
    assert not (tmp_path / "out" / PLAN_FILE).exists()


def test_graph_forms_that_would_compute_wrongly_are_named():
    node = helper.make_node("Attention", ["q", "k", "v", "", "", "", "nonpad"], ["y"], name="a", is_causal=1)
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    problems = unsupported_graph_forms(model)
    assert any("nonpad_kv_seqlen" in p for p in problems) and any("is_causal=1" in p for p in problems)


def _plan(**fields) -> TensorRTPlan:
    return TensorRTPlan(**{**dict(compute_capability_targets=None, profiles=[], native_layers={},
                                  attention_decomposable=False, plan_file="model.plan", plan_sha256="",
                                  build_log_file="tensorrt_build.log", timing_cache_file=None, build_seconds=0.0),
                           **fields})


def test_plan_mismatch_names_what_differs():
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    section = _plan(module="tensorrt", version="10.15.1", gpu=h100)
    assert plan_mismatch(section, "tensorrt", "10.15.1", h100) is None
    assert "built by tensorrt 10.15.1 but this is tensorrt 10.16.0" in plan_mismatch(section, "tensorrt",
                                                                                      "10.16.0", h100)
    l40 = {"name": "NVIDIA L40S", "compute_capability": "8.9"}
    assert "compute capability 9.0" in plan_mismatch(section, "tensorrt", "10.15.1", l40)
    # Same compute capability, another GPU model: a plan is tuned for (and tied to) the model it was built on.
    h200 = {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert "built for NVIDIA H100 80GB HBM3" in plan_mismatch(section, "tensorrt", "10.15.1", h200)
    assert "this GPU is NVIDIA H200" in plan_mismatch(section, "tensorrt", "10.15.1", h200)
    assert "this GPU is None" in plan_mismatch(section, "tensorrt", "10.15.1", None)
    offline = _plan(module="tensorrt_rtx", version="1.7.1.116", gpu=None)
    assert "built by tensorrt_rtx" in plan_mismatch(offline, "tensorrt", "10.15.1", h100)


def test_runtime_available_explains_itself():
    """Runnable exactly when the full tensorrt imports and torch sees a CUDA device; otherwise it names which."""
    ok, why = runtime_available()
    has_tensorrt, has_cuda = _importable("tensorrt"), torch.cuda.is_available()
    assert ok == (has_tensorrt and has_cuda)
    if not has_tensorrt:
        expected = "only tensorrt_rtx is installed" if _importable("tensorrt_rtx") else "not installed"
        assert expected in why
    elif not has_cuda:
        assert why.endswith("there is no CUDA device")
    else:
        assert torch.cuda.get_device_name() in why


# ------------------------------------------------------------------------------------------------ GPU runtime


@pytest.mark.gpu
@needs_runtime
def test_tiny_engine_matches_the_fp32_reference(tmp_path):
    from engines.greedy import teacher_forced
    from export.reference_engine import ReferenceEngine

    config, max_context = CONFIGS["tiny"], 256
    spec, section = _export_and_build(tmp_path, "tiny", max_batch=4, max_context=max_context)
    engine = TensorRTEngine(tmp_path, spec, section)

    # A ragged batch: prompts of 5, 9 and 2 tokens, right-padded; then decode steps fed the fp32 reference's
    # greedy tokens, so every runtime sees the same inputs however it ranks the logits. The reference in fp16
    # on the CPU runs alongside as a yardstick: what fp16 alone costs.
    rng = np.random.default_rng(0)
    lengths = [5, 9, 2]
    prompt = rng.integers(13, config.vocab_size, size=(3, max(lengths)), dtype=np.int64)
    prompts = [prompt[row, :n].tolist() for row, n in enumerate(lengths)]
    fp32 = ReferenceEngine(tiny_model(config).float(), spec.max_batch, max_context)
    fp16 = ReferenceEngine(tiny_model(config).half(), spec.max_batch, max_context)

    decode_steps, graph_steps = 6, 0
    for step in teacher_forced([fp32, engine, fp16], prompts, decode_steps):
        want, got, fp16_logits = step.logits
        graph_steps += engine.last_step_used_graph
        error, fp16_error = np.abs(got - want).max(), np.abs(fp16_logits - want).max()
        agree = got.argmax(-1) == want.argmax(-1)
        log.info("step seq=%d: max |TensorRT - fp32| = %.4g (fp16 torch: %.4g), top-1 agree %s",
                 step.input_ids.shape[1], error, fp16_error, agree.tolist())
        assert error <= max(4 * fp16_error, 5e-2), f"TensorRT logits off by {error} (fp16 torch: {fp16_error})"
        assert agree.mean() >= 2 / 3, f"top-1 agrees on only {agree.tolist()}"
    log.info("decode steps replayed from a CUDA graph: %d of %d", graph_steps, decode_steps)
    # The prefill and the first decode step (which binds the decode context) run eagerly; every later decode step
    # replays the graph, although prefill ran on the same engine in between (it has its own context).
    assert graph_steps == decode_steps - 1

    # The caches were advanced in place: every real position holds the reference's key.
    key0 = engine.read_cache(step.states[1])[0][0].astype(np.float32)
    ref_key0 = fp32.read_cache(step.states[0])[0][0]
    for row, end in enumerate(step.filled):
        assert np.abs(key0[row, :, :end] - ref_key0[row, :, :end]).max() < 5e-2


@pytest.mark.gpu
@needs_runtime
def test_plan_from_another_version_is_refused(tmp_path):
    spec, section = _export_and_build(tmp_path, "tiny", max_batch=1, max_context=64)
    tampered = dataclasses.replace(section, version="0.0.0")
    with pytest.raises(EngineError, match="built by tensorrt 0.0.0"):
        TensorRTEngine(tmp_path, spec, tampered)
    tampered = dataclasses.replace(section, gpu={**section.gpu, "compute_capability": "1.0"})
    with pytest.raises(EngineError, match="compute capability 1.0"):
        TensorRTEngine(tmp_path, spec, tampered)
    tampered = dataclasses.replace(section, gpu={**section.gpu, "name": "another GPU of the same architecture"})
    with pytest.raises(EngineError, match="built for another GPU of the same architecture"):
        TensorRTEngine(tmp_path, spec, tampered)


@pytest.mark.gpu
@needs_runtime
def test_close_frees_graphs_contexts_and_device_memory(tmp_path):
    spec, section = _export_and_build(tmp_path, "tiny", max_batch=1, max_context=64)
    with TensorRTEngine(tmp_path, spec, section) as engine:
        state = engine.allocate(1)
        engine.step(state, np.array([[13, 14, 15]]), np.zeros(1, np.int64), np.array([2]))
        for position in (3, 4, 5):  # eager, then capture + replay
            engine.step(state, np.array([[42]]), np.array([position]), np.zeros(1, np.int64))
        assert engine.last_step_used_graph and state.graphs
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert state.graphs == {}, "the decode graphs outlived the engine"
    assert torch.cuda.memory_allocated() < held, "closing freed no device memory"
    with pytest.raises(EngineError, match="closed"):
        engine.step(state, np.array([[42]]), np.array([6]), np.zeros(1, np.int64))
    engine.close()  # idempotent


@pytest.mark.gpu
@needs_runtime
def test_decode_step_time_follows_the_kv_bucket(tmp_path, record_property):
    """Decode reads the smallest bucket of cache slots that covers its longest row, one CUDA graph per bucket: a
    step at context 200 (bucket 256) must cost less than one at 8000 (bucket 8192). The model is sized so that the
    cache reads are visible above launch overhead: 8 layers, 4 kv heads of 128, 8 rows (1 GiB of fp16 cache read
    per step at 8192)."""
    config = _random_config(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=8)
    spec = _spec(config, "float16", max_batch=8, max_context=8192)
    torch.manual_seed(0)
    onnx_path = export_onnx(CohereForCausalLM(config).half(), spec, tmp_path)
    section = build_plan(onnx_path, spec, tmp_path)
    engine = TensorRTEngine(tmp_path, spec, section)
    state = engine.allocate(8)
    rows = np.arange(8)
    ms = {}
    for context in (200, 1000, 8000):  # buckets 256, 1024, 8192
        ids, last = np.full((8, 1), 42), np.zeros(8, np.int64)
        write = np.full(8, context - 1) - rows  # rows at different positions; the longest row decides
        for _ in range(3):  # warm up: eager step, then graph capture
            engine.step(state, ids, write, last)
        start = time.perf_counter()
        for _ in range(50):
            engine.step(state, ids, write, last)
            assert engine.last_step_used_graph, f"a decode step at context {context} ran eagerly"
        ms[context] = (time.perf_counter() - start) / 50 * 1e3
        bucket = kv_bucket(kv_buckets(spec.max_context), write, 1)
        assert engine.last_step_kv_slots == bucket
        log.info("decode step, 8 rows, context %d (bucket %d): %.3f ms (CUDA graph replayed)", context, bucket,
                 ms[context])
        record_property(f"decode_ms_at_{context}", ms[context])
    assert set(state.graphs) == {(8, 256), (8, 1024), (8, 8192)}
    assert ms[200] < ms[8000], f"the 256-slot bucket is not cheaper than all 8192 slots: {ms}"
    engine.close()


@pytest.mark.gpu
@needs_runtime
def test_greedy_generation_equals_onnxruntime_fp16(tmp_path):
    """The TensorRT plan and ONNX Runtime, both on the same fp16 graph, pick the same greedy token wherever the
    choice is clear: where ONNX Runtime's top-two logit gap exceeds the fp16 logits tolerance. Two fp16
    implementations may rank a near-tie either way, so near-ties are not compared, and both are fed ONNX Runtime's
    token at every step so that one near-tie does not make every later step differ."""
    from engines import Artifact, open_engine
    from engines.greedy import teacher_forced
    from export.build import ExportOptions, build

    out = build(ExportOptions(model="tiny", out=tmp_path / "art", dtype="float16", max_batch=3, max_context=128,
                              engine="tensorrt"))
    artifact = Artifact.open(out)
    assert artifact.manifest.parity.reports["tensorrt"]["passed"]  # export verified the plan on this GPU
    prompts = [[5, 17, 42, 99, 3], [5, 300, 12], [5]]
    compared, decode_steps = 0, 15
    with open_engine(artifact, "onnxruntime") as theirs, open_engine(artifact, "tensorrt") as ours:
        # Both are fed ONNX Runtime's token at every step (it is the first engine).
        for i, step in enumerate(teacher_forced([theirs, ours], prompts, decode_steps)):
            their_logits, our_logits = step.logits
            # The parity rule's fp16 bound: relative to the logits' magnitude, as fp16 error grows with it.
            bound = TOLERANCES["float16"].logits_max_abs * np.abs(their_logits).max()
            second, first = np.sort(their_logits, axis=-1)[:, -2:].T
            clear = first - second > bound
            differ = our_logits.argmax(-1) != their_logits.argmax(-1)
            assert not (clear & differ).any(), (f"step {i}: rows {np.flatnonzero(clear & differ).tolist()} pick "
                                                f"another token where the top-two gap exceeds {bound:.3g}")
            compared += int(clear.sum())
    log.info("greedy tokens compared where the choice is clear: %d of %d", compared, 3 * (1 + decode_steps))
    assert compared > 0, "no step had a clear greedy choice, so nothing was compared"

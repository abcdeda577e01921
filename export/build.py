"""Checkpoint → artifact folder: load, trace to ONNX, (optionally) build TensorRT, verify parity, write manifest.

Everything is written into a temporary folder beside ``out`` and swapped into place at the end, so an
interrupted (Ctrl-C, SIGTERM) or failed export never leaves a half folder and never damages the previous
artifact. ``out`` is replaced only when it is missing, empty or an artifact of ours: never the checkpoint, never
a folder of someone else's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from engines import Artifact, EngineError, open_engine, tensorrt_unusable_reason
from engines.artifact import (FORMAT_VERSION, MANIFEST, Build, FileEntry, Graph, Manifest, Parity, Quantization,
                              Source, TensorRT, sha256_file)
from engines.base import LIMITS, GraphSpec
from engines.memory import MemoryPlan, default_budget, quantized_weight_bytes
from engines.onnxruntime import OnnxRuntimeEngine
from reference import CohereConfig, resolve_checkpoint
from reference.quantize import WeightQuantization, quantized_linear_weights
from reference.weights import check_checkpoint

from . import parity, quality
from .gqa_graph import GQA_ONNX_FILE
from .onnx_graph import ONNX_FILE, OPSET, export_graph
from .reference_engine import StreamedReferenceEngine
from .weights_writer import CheckpointWeights

log = logging.getLogger(__name__)

# Files a serving process needs besides the graph. serve.Generator loads tokenizer.json and tokenizer_config.json,
# so export refuses a checkpoint without them (as vLLM refuses a model without a tokenizer) rather than write an
# artifact nothing can serve; special_tokens_map.json is copied when present.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"
ENGINES = ("auto", "onnx", "tensorrt")


class ExportError(ValueError):
    """Bad input to the export, named in the message."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    model: str
    out: Path | None = None
    dtype: str = "float32"
    max_batch: int | None = 8  # None: the largest batch that fits the memory budget
    max_context: int = 2048
    engine: str = "auto"
    verify: bool = True
    memory_budget: int | None = None  # bytes the artifact may use where it runs; None: free memory less a margin
    quantize: str | None = None  # "int8" or "int4": weight-only quantization of the projections
    block_size: int | None = None  # inputs per scale; None: DEFAULT_BLOCK_SIZE of the mode
    ort_accuracy_level: int = 4  # ONNX Runtime's MatMulNBits activations: 4 int8 (fast), 1 fp32

    def quantization(self) -> WeightQuantization | None:
        if self.quantize is None:
            return None
        if self.quantize not in QUANTIZE_MODES:
            raise ExportError(f"--quantize {self.quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        block = self.block_size or DEFAULT_BLOCK_SIZE[self.quantize]
        try:
            return WeightQuantization(bits=QUANTIZE_MODES[self.quantize], block_size=block)
        except ValueError as e:
            raise ExportError(f"--block-size {block}: {e}") from None


QUANTIZE_MODES = {"int8": 8, "int4": 4}
# int4 loses more per block than int8, so it takes the finer default; 128 makes int8's scales 3% of its bytes.
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 32}
ORT_ACCURACY_LEVELS = (1, 4)
MIN_DISTINCT_TOKENS = 16  # of the held-out text, for its quality figures to mean anything


def default_out(model: str, dtype: str, quantize: str | None = None) -> Path:
    name = Path(model.rstrip("/")).name if Path(model).is_dir() else model.split("/")[-1]
    return Path("build") / f"{name}-{dtype}{f'-{quantize}' if quantize else ''}"


def model_context_limit(config: CohereConfig, tokenizer_config: dict) -> int:
    """The longest context the checkpoint claims: Command-R's config says 8192 while its tokenizer config
    says 131072, the length it was trained for; the larger is the model's."""
    limit = config.max_position_embeddings
    claimed = tokenizer_config.get("model_max_length")
    if isinstance(claimed, int) and claimed < 10**7:  # transformers writes 1e30 for "unset"
        limit = max(limit, claimed)
    return limit


def _check_serving_files(folder: Path, config: CohereConfig) -> dict:
    """Check, before any work, the checkpoint files that serve reads from the artifact, so that export never writes
    an artifact serve cannot load; returns the parsed tokenizer_config.json."""
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: no {name}; serving the artifact needs it. Copy the model's {name} into the "
                              "checkpoint folder (transformers: AutoTokenizer.from_pretrained(...).save_pretrained)")
    path = folder / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any malformed file
        raise ExportError(f"{path}: the tokenizers library cannot load it ({e})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= config.vocab_size:
        raise ExportError(f"{path}: has token id {largest}, outside the model's vocab_size {config.vocab_size} "
                          "(is it the tokenizer of this checkpoint?)")

    tokenizer_config = _json_object(folder / "tokenizer_config.json")
    template = tokenizer_config.get("chat_template")
    if not (template is None or isinstance(template, str) or isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise ExportError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                          "{'name': str, 'template': str}")

    generation = folder / GENERATION_CONFIG
    problem = _generation_config_problem(_json_object(generation) if generation.exists()
                                         else config.generation_config(), config.vocab_size)
    if problem:
        raise ExportError(f"{generation if generation.exists() else folder / 'config.json'}: {problem}")
    return tokenizer_config


def _json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _generation_config_problem(raw: dict, vocab_size: int) -> str | None:
    """What in a generation_config.json serve cannot use (the fields it reads, with the bounds its sampler
    checks), or None. Unset (null) fields take transformers' defaults."""
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN

    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = raw.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(integer(i) and 0 <= i < vocab_size for i in ids):
            return f"{name} {value!r}: must be a token id in [0, {vocab_size})"
    checks = {"do_sample": (lambda v: isinstance(v, bool), "must be true or false"),
              "temperature": (lambda v: number(v) and v >= 0, "must be a number >= 0"),
              "top_k": (lambda v: integer(v) and v >= 0, "must be an integer >= 0"),
              "top_p": (lambda v: number(v) and 0 < v <= 1, "must lie in (0, 1]"),
              "min_p": (lambda v: number(v) and 0 <= v <= 1, "must lie in [0, 1]"),
              "repetition_penalty": (lambda v: number(v) and v > 0, "must be a number > 0"),
              "max_new_tokens": (lambda v: integer(v) and v >= 1, "must be an integer >= 1")}
    for name, (valid, why) in checks.items():
        if raw.get(name) is not None and not valid(raw[name]):
            return f"{name} {raw[name]!r}: {why}"
    return None


def build(opts: ExportOptions) -> Path:
    """Run the whole export; returns the artifact folder. Raises ExportError on bad input or failed parity."""
    started = time.perf_counter()
    if opts.dtype not in ("float16", "float32"):
        raise ExportError(f"--dtype {opts.dtype!r}: choose float16 or float32")
    if opts.engine not in ENGINES:
        raise ExportError(f"--engine {opts.engine!r}: choose one of {', '.join(ENGINES)}")
    if opts.max_batch is not None and opts.max_batch < 1:
        raise ExportError(f"--max-batch {opts.max_batch}: must be at least 1")
    if opts.memory_budget is not None and opts.memory_budget < 1:
        raise ExportError(f"--memory-budget {opts.memory_budget}: must be a positive number of bytes")
    if opts.max_context < 2:
        raise ExportError(f"--max-context {opts.max_context}: must be at least 2")
    if opts.block_size is not None and opts.quantize is None:
        raise ExportError(f"--block-size {opts.block_size}: applies only with --quantize int8 or int4")
    if opts.ort_accuracy_level not in ORT_ACCURACY_LEVELS:
        raise ExportError(f"--ort-accuracy-level {opts.ort_accuracy_level}: choose 1 (fp32 activations) or 4 (int8)")
    opts.quantization()  # refuses a bad mode or block size before any work
    out = Path(opts.out or default_out(opts.model, opts.dtype, opts.quantize)).absolute()
    if out.is_symlink():
        raise ExportError(f"--out {out}: is a symlink; pass the folder itself")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; pass a folder path")

    log.info("resolving %s", opts.model)
    folder = resolve_checkpoint(opts.model)
    checked = _check_out(out, folder)
    try:
        return _build_checked(opts, started, out, folder, checked)
    finally:
        if checked is not None:
            checked.close()


def _build_checked(opts: ExportOptions, started: float, out: Path, folder: Path,
                   checked: _ApprovedFolder | None) -> Path:
    config = CohereConfig.from_json_file(folder / "config.json")
    tokenizer_config = _check_serving_files(folder, config)
    limit = model_context_limit(config, tokenizer_config)
    if opts.max_context > limit:
        raise ExportError(f"--max-context {opts.max_context} exceeds the model's context of {limit} tokens "
                          "(max_position_embeddings / model_max_length)")
    files = check_checkpoint(folder, config)  # tensor names and shapes against the config, from the headers
    weight_bytes = sum(p.stat().st_size for p in set(files.values()))
    memory = memory_plan(config, opts)
    _check_disk(out.parent, memory.weight_bytes)
    print(memory.table())
    try:
        spec = GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                         head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=memory.max_batch,
                         max_context=opts.max_context, dtype=opts.dtype)
    except ValueError as e:  # a size past what an artifact may declare (engines.base.LIMITS)
        raise ExportError(f"{folder / 'config.json'} or the flags give a graph this project does not build: {e}"
                          ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    with _sigterm_interrupts():
        tmp = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(out)}{os.getpid()}-", dir=out.parent))
        try:
            sections = _build_into(tmp, opts, folder, config, spec) | {"memory": memory}
            artifact_files = _artifact_files(tmp)
            _write_manifest(tmp, sections, Parity(skipped="verification did not finish"), _build_info(
                started, weight_bytes), artifact_files)
            if opts.verify:  # through the same Artifact and open_engine a server uses
                parity_section = _verify(Artifact.open(tmp, verify=False), folder, opts.quantization())
            else:
                parity_section = Parity(skipped="--skip-verify")
            _write_manifest(tmp, sections, parity_section, _build_info(started, weight_bytes), artifact_files)
            tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
            _replace(tmp, out, checked)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("artifact written to %s (%.1f s)", out, time.perf_counter() - started)
    return out


def target_device(engine: str) -> str:
    """Where the artifact will run: TensorRT, and ONNX Runtime where its CUDA provider is installed, run on the
    GPU; otherwise ONNX Runtime runs on the host."""
    from engines.onnxruntime import cuda_available

    return "cuda" if engine == "tensorrt" or cuda_available() else "cpu"


def memory_plan(config: CohereConfig, opts: ExportOptions) -> MemoryPlan:
    """The memory plan of this export on the device that will run it, checked before any work: refused (naming
    what would fit) when it cannot fit the budget; ``max_batch=None`` takes the largest batch that fits."""
    device = target_device(opts.engine)
    budget = opts.memory_budget if opts.memory_budget is not None else default_budget(device)
    quantization = opts.quantization()
    weight_bytes = None if quantization is None else quantized_weight_bytes(
        config.to_dict(), opts.dtype, quantization.bits, quantization.block_size)
    plan = MemoryPlan.for_config(config.to_dict(), opts.dtype, opts.max_batch or 1, opts.max_context, device, budget,
                                 weight_bytes)
    if opts.max_batch is None:
        if budget is None:
            raise ExportError(f"--max-batch auto: the free memory of {device} cannot be told here; pass "
                              "--memory-budget (e.g. --memory-budget 80GB)")
        largest = min(plan.largest_batch(), LIMITS["max_batch"])
        if largest < 1:
            raise ExportError(f"--max-batch auto: not one row fits: {plan.refusal()}")
        plan = dataclasses.replace(plan, max_batch=largest)
        log.info("--max-batch auto: %d rows of %d tokens fit the %s budget", largest, opts.max_context, device)
    if budget is None:
        log.warning("the free memory of %s cannot be told here, so the memory plan is not checked; pass "
                    "--memory-budget to check it", device)
    refusal = plan.refusal()
    if refusal:
        raise ExportError(f"the artifact would not fit where it runs: {refusal} (--memory-budget sets the budget)")
    return plan


def _build_info(started: float, weight_bytes: int) -> Build:
    return Build(seconds=round(time.perf_counter() - started, 2), weight_bytes=weight_bytes,
                 peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _build_into(tmp: Path, opts: ExportOptions, folder: Path, config: CohereConfig, spec: GraphSpec) -> dict:
    weights = CheckpointWeights(folder, config)  # refuses missing, misshapen or quantized tensors before any work
    quantization = opts.quantization()
    log.info("tracing the decoder to ONNX (opset %d, static cache of %d tokens) and streaming the %s weights",
             OPSET, spec.max_context, opts.dtype if quantization is None else
             f"{quantization.name} (block {quantization.block_size}, {opts.dtype} scales)")
    export_graph(config, weights, spec, tmp, quantization)

    for name in CHECKPOINT_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, tmp / name)
    generation = folder / GENERATION_CONFIG
    if generation.exists():
        shutil.copyfile(generation, tmp / GENERATION_CONFIG)
    else:  # as transformers derives it from config.json
        (tmp / GENERATION_CONFIG).write_text(json.dumps(config.generation_config(), indent=2) + "\n")

    tensorrt = _maybe_build_tensorrt(tmp, opts, spec)
    return dict(
        format_version=FORMAT_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=Source(model=opts.model, folder=str(folder.resolve()),
                      files=_hash_files(sorted(_source_files(folder)), "hashing the checkpoint")),
        config=config.to_dict(),
        graph=Graph(spec=spec, opset=OPSET, onnx_file=ONNX_FILE, onnxruntime_cpu_file=GQA_ONNX_FILE, **spec.io()),
        tensorrt=tensorrt,
        tools=_tool_versions(),
        quantization=None if quantization is None else Quantization(
            method=quantization.method, bits=quantization.bits, block_size=quantization.block_size,
            scale_dtype=opts.dtype, weights=[*quantized_linear_weights(config.num_hidden_layers), "lm_head"],
            onnxruntime_accuracy_level=opts.ort_accuracy_level),
    )


def _source_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in (
        *CHECKPOINT_FILES, GENERATION_CONFIG, "model.safetensors.index.json"))]


def _maybe_build_tensorrt(tmp: Path, opts: ExportOptions, spec: GraphSpec) -> TensorRT:
    if opts.engine == "onnx":
        return TensorRT(reason="--engine onnx")
    from engines import tensorrt, tensorrt_build

    if opts.engine == "auto":
        runnable, why = tensorrt.runtime_available()
        if not runnable:
            log.info("TensorRT engine not built: %s (ask for one with --engine tensorrt)", why)
            return TensorRT(reason=why)
    log.info("building the TensorRT engine")
    return TensorRT(plan=tensorrt_build.build_plan(tmp / ONNX_FILE, spec, tmp))


def _verify(artifact: Artifact, folder: Path, quantization: WeightQuantization | None) -> Parity:
    """Parity of every engine that can run here, keyed by backend; a plan that cannot run says why. Engines are
    opened by ``open_engine`` from the finished folder, exactly as a server opens them, one after the other, each
    closed before the next opens. The fp32 reference streams its weights from the checkpoint one layer at a time,
    so verifying costs what running the artifact costs plus the largest layer in fp32 (recorded in each report's
    ``reference`` entry).

    A quantized artifact is held exact against the reference running the same dequantized weights (with the
    bound of int8 activations where ONNX Runtime CPU quantizes them)."""
    log.info("verifying parity against the fp32 reference%s, streamed layer by layer from %s",
             "" if quantization is None else f" with the same {quantization.name} weights", folder)
    config = CohereConfig.from_json_file(folder / "config.json")
    scale_dtype = getattr(torch, artifact.spec.dtype)
    reference = StreamedReferenceEngine(folder, config, *parity.reference_bounds(artifact.spec),
                                        quantized=None if quantization is None else (quantization, scale_dtype))
    backends, unmeasured = ["onnxruntime"], {}
    if artifact.manifest.tensorrt.built:
        why = tensorrt_unusable_reason(artifact)
        if why is None:
            backends.append("tensorrt")
        else:
            log.warning("TensorRT plan not verified: %s", why)
            unmeasured["tensorrt"] = why
    reports = {}
    for backend in backends:
        try:
            engine = open_engine(artifact, backend)
        except EngineError as e:
            raise ExportError(f"the exported artifact does not open on {backend}: {e}") from None
        int8_activations = (quantization is not None and engine.backend == "onnxruntime-cpu"
                            and artifact.manifest.quantization.onnxruntime_accuracy_level == 4)
        with engine:
            report = parity.measure(reference, engine, tolerance=parity.tolerance_for(artifact.spec.dtype,
                                                                                      int8_activations))
            print(parity.format_table(report))
            _refuse_failed(report, f"{engine.backend} parity check", f"the {artifact.spec.dtype} tolerance")
            if quantization is not None:
                report["quality"] = _quality(artifact, folder, config, engine, quantization)
        report["reference"] = {"mode": "streamed", "largest_resident_bytes": reference.largest_resident_bytes}
        if isinstance(engine, OnnxRuntimeEngine):  # which of the artifact's graphs was measured
            report["onnx_file"] = engine.onnx_path.name
        log.info("verified %s; the streamed reference held at most %.1f MB of fp32 weights at once",
                 engine.backend, reference.largest_resident_bytes / 1e6)
        reports[engine.backend] = report
    return Parity(reports=reports, unmeasured=unmeasured)


def _quality(artifact: Artifact, folder: Path, config: CohereConfig, engine, quantization: WeightQuantization
             ) -> dict:
    """A quantized engine against the unquantized fp32 reference (streamed too) on held-out text: top-1 agreement,
    mean KL and the perplexity ratio, each gated per mode (export/quality.py)."""
    reference = StreamedReferenceEngine(folder, config, *parity.reference_bounds(artifact.spec))
    log.info("measuring the quality of %s against the unquantized reference on held-out text", quantization.name)
    try:
        tokens = quality.default_tokens(artifact.path("tokenizer.json"))
    except quality.TextError as e:
        raise ExportError(f"cannot measure the quality of the quantized artifact: {e}") from None
    distinct = len(set(tokens))
    if distinct < MIN_DISTINCT_TOKENS:
        # A tokenizer that knows none of the text's words (a word-level test tokenizer) reads it as a few unknown
        # ids: any figure from that says nothing of quality, and a gate on it would fail or pass by chance.
        why = (f"the held-out text tokenizes to only {distinct} distinct ids with this checkpoint's tokenizer; "
               "measure quality on your own text: python -m export.parity ARTIFACT --perplexity FILE")
        log.warning("quality of the %s artifact not measured: %s", quantization.name, why)
        return {"skipped": why}
    report = quality.measure(reference, engine, tokens, quantization.bits)
    print(quality.format_table(report))
    _refuse_failed(report, f"{engine.backend} {quantization.name} quality check",
                   f"the {quantization.name} quality gate")
    return report


def _refuse_failed(report: dict, what: str, bound: str) -> None:
    if not report["passed"]:
        failed = ", ".join(r["output"] for r in report["rows"] if not r["passed"])
        raise ExportError(f"{what} failed ({failed}) past {bound}; nothing was written. Use --skip-verify to write "
                          "the artifact anyway (recorded in its manifest).")


def _artifact_files(tmp: Path) -> dict[str, FileEntry]:
    paths = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    hashes = _hash_files(paths, "hashing the artifact")
    return {p.name: FileEntry(sha256=hashes[p.name], bytes=p.stat().st_size) for p in paths}


def _write_manifest(tmp: Path, sections: dict, parity_section: Parity, build_info: Build,
                    files: dict[str, FileEntry]) -> None:
    manifest = Manifest(**sections, parity=parity_section, build=build_info, files=files)
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def _hash_files(paths: list[Path], desc: str) -> dict[str, str]:
    with tqdm(total=sum(p.stat().st_size for p in paths), desc=desc, unit="B", unit_scale=True, disable=None,
              leave=False) as bar:
        return {p.name: sha256_file(p, bar.update) for p in paths}


# ------------------------------------------------------------------------------------- the --out folder, safely


class _ApprovedFolder:
    """The folder ``_check_out`` approved for replacement, held open until the swap: while a descriptor is open its
    inode cannot be reused, so a folder another process puts in its place never passes for it (a remembered
    (device, inode) pair alone can name a new folder once the old one is deleted)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def is_(self, path: Path) -> bool:
        held, there = os.fstat(self.fd), path.stat()
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def close(self) -> None:
        os.close(self.fd)


def _check_out(out: Path, checkpoint: Path) -> _ApprovedFolder | None:
    """``out`` may be replaced only when it is missing, empty, or an artifact holding nothing but its own files:
    export never deletes what it did not write (as git refuses to overwrite untracked files). Returns the folder
    found there, held open until the swap (the caller closes it), or None."""
    source = checkpoint.resolve()
    target = out.resolve()
    if target == source or target in source.parents:
        raise ExportError(f"--out {out}: holds the checkpoint being exported ({checkpoint}); replacing it would "
                          "delete the checkpoint. Pass another folder.")
    if not out.is_dir():
        return None
    approved = _ApprovedFolder(out)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return approved
    listed = _artifact_listing(out)
    if listed is None:
        approved.close()
        raise ExportError(f"--out {out}: a folder that is not empty and not an artifact (no {MANIFEST} written by "
                          "`python -m export`); export replaces only its own artifacts. Pass a new or empty folder.")
    foreign = [name for name in entries if name != MANIFEST and name not in listed]
    if foreign:
        approved.close()
        raise ExportError(f"--out {out}: an artifact holding files its manifest does not list "
                          f"({', '.join(foreign[:5])}); export would delete them. Move them away or pass another "
                          "folder.")
    return approved


def _artifact_listing(folder: Path) -> set[str] | None:
    """The file names an artifact folder's manifest lists, or None if the folder holds no manifest of ours. Any
    format version counts: re-exporting over an older artifact is how it is upgraded."""
    try:
        raw = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(raw, dict) and isinstance(raw.get("format_version"), int) and "graph" in raw
            and isinstance(raw.get("files"), dict)):
        return None
    return set(raw["files"])


def _temporary_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary folders that an earlier export of ``out`` left behind (killed by SIGKILL, or the machine
    went down). Only ours: named ``.NAME.tmp-<pid>-...`` by this module, of a process on this machine that is gone."""
    pattern = re.compile(re.escape(_temporary_prefix(out)) + r"(\d+)-")
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if not match or path.is_symlink() or not path.is_dir() or _process_alive(int(match.group(1))):
            continue
        log.info("removing %s, left by an interrupted export (process %s)", path, match.group(1))
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a container stop, ``kill``) unwinds like Ctrl-C, so the temporary folder is removed on the way
    out; the exit status is the conventional 128 + 15."""
    def terminate(signum, frame):
        log.warning("SIGTERM: stopping the export")
        raise SystemExit(128 + signal.SIGTERM)

    with _sigterm_handler(terminate):
        yield


@contextlib.contextmanager
def _sigterm_deferred():
    """SIGTERM waits until the block is done (a swap must not stop halfway), then is delivered as before."""
    received = []
    with _sigterm_handler(lambda signum, frame: received.append(signum)):
        yield
    if received:
        signal.raise_signal(signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_handler(handler):
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from there
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the C library or the file system
    does not offer it (then nothing happened)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _replace(tmp: Path, out: Path, checked: _ApprovedFolder | None) -> None:
    """Move the finished folder into place. An existing artifact is swapped with it in one step, so ``out`` is
    never missing, then removed from where the new one was, if it is the folder ``_check_out`` approved
    (``checked``). SIGTERM waits until the swap is complete."""
    with _sigterm_deferred():
        if not out.exists():
            tmp.rename(out)
            return
        if _exchange(tmp, out):
            old = tmp
        else:  # no renameat2 (not Linux, or an old kernel or file system): a moment without `out`
            old = out.with_name(f"{_temporary_prefix(out)}{os.getpid()}-old")
            out.rename(old)
            tmp.rename(out)
        if checked is None or not checked.is_(old):  # replaced by someone else since it was checked
            kept = out.with_name(f".{out.name}.replaced-{int(time.time())}")
            old.rename(kept)
            log.warning("%s changed while the export replaced it; what was there is kept in %s", out, kept)
            return
        shutil.rmtree(old)


def _check_disk(where: Path, needed: int) -> None:
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ExportError(f"not enough disk space in {probe}: {free / 1e9:.1f} GB free, the artifact needs about "
                          f"{needed / 1e9:.1f} GB")


def _tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt_rtx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions

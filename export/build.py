"""Checkpoint → artifact folder: load, trace to ONNX, (optionally) build TensorRT, verify parity, write manifest.

Everything is written into a temporary folder beside ``out`` and renamed into place at the end, so an
interrupted or failed export never leaves a half folder and never damages the previous artifact.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import platform
import resource
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm

from engines.artifact import (FORMAT_VERSION, MANIFEST, Build, FileEntry, Graph, Manifest, Parity, Source, TensorRT,
                              sha256_file)
from engines.base import GraphSpec
from reference import CohereConfig, load_checkpoint, resolve_checkpoint
from reference.weights import checkpoint_files

from . import parity
from .onnx_graph import ONNX_FILE, OPSET, export_onnx

log = logging.getLogger(__name__)

# Files a serving process needs besides the graph; tokenizer files are optional in a checkpoint (a bare
# weights folder can still be exported and run on token ids).
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG = "generation_config.json"
ENGINES = ("auto", "onnx", "tensorrt")


class ExportError(ValueError):
    """Bad input to the export, named in the message."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    model: str
    out: Path | None = None
    dtype: str = "float32"
    max_batch: int = 8
    max_context: int = 2048
    engine: str = "auto"
    verify: bool = True


def default_out(model: str, dtype: str) -> Path:
    name = Path(model.rstrip("/")).name if Path(model).is_dir() else model.split("/")[-1]
    return Path("build") / f"{name}-{dtype}"


def model_context_limit(config: CohereConfig, folder: Path) -> int:
    """The longest context the checkpoint claims: Command-R's config says 8192 while its tokenizer config
    says 131072, the length it was trained for; the larger is the model's."""
    limit = config.max_position_embeddings
    tok_config = folder / "tokenizer_config.json"
    if tok_config.exists():
        claimed = json.loads(tok_config.read_text()).get("model_max_length")
        if isinstance(claimed, int) and claimed < 10**7:  # transformers writes 1e30 for "unset"
            limit = max(limit, claimed)
    return limit


def build(opts: ExportOptions) -> Path:
    """Run the whole export; returns the artifact folder. Raises ExportError on bad input or failed parity."""
    started = time.perf_counter()
    if opts.dtype not in ("float16", "float32"):
        raise ExportError(f"--dtype {opts.dtype!r}: choose float16 or float32")
    if opts.engine not in ENGINES:
        raise ExportError(f"--engine {opts.engine!r}: choose one of {', '.join(ENGINES)}")
    if opts.max_batch < 1:
        raise ExportError(f"--max-batch {opts.max_batch}: must be at least 1")
    if opts.max_context < 2:
        raise ExportError(f"--max-context {opts.max_context}: must be at least 2")
    out = Path(opts.out or default_out(opts.model, opts.dtype))
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; pass a folder path")

    log.info("resolving %s", opts.model)
    folder = resolve_checkpoint(opts.model)
    config = CohereConfig.from_json_file(folder / "config.json")
    limit = model_context_limit(config, folder)
    if opts.max_context > limit:
        raise ExportError(f"--max-context {opts.max_context} exceeds the model's context of {limit} tokens "
                          "(max_position_embeddings / model_max_length)")
    files = checkpoint_files(folder)
    weight_bytes = sum(p.stat().st_size for p in set(files.values()))
    _check_disk(out.parent, weight_bytes * (1 if opts.dtype == "float16" else 2))

    spec = GraphSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, vocab_size=config.vocab_size, max_batch=opts.max_batch,
                     max_context=opts.max_context, dtype=opts.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sections = _build_into(tmp, opts, folder, config, spec)
        build_info = Build(seconds=round(time.perf_counter() - started, 2), weight_bytes=weight_bytes,
                           peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        _write_manifest(tmp, sections, build_info)
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact written to %s (%.1f s)", out, time.perf_counter() - started)
    return out


def _build_into(tmp: Path, opts: ExportOptions, folder: Path, config: CohereConfig, spec: GraphSpec) -> dict:
    log.info("loading %s weights (%s)", folder, opts.dtype)
    model, _ = load_checkpoint(folder, getattr(torch, opts.dtype))
    log.info("tracing the decoder to ONNX (opset %d, static cache of %d tokens)", OPSET, spec.max_context)
    export_onnx(model, spec, tmp)
    del model  # the export's copy of the weights; verification loads the fp32 reference afresh
    gc.collect()

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
        graph=Graph(spec=spec, opset=OPSET, onnx_file=ONNX_FILE, **spec.io()),
        tensorrt=tensorrt,
        parity=_verify(tmp, folder, spec, tensorrt) if opts.verify else Parity(skipped="--skip-verify"),
        tools=_tool_versions(),
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


def _verify(tmp: Path, folder: Path, spec: GraphSpec, tensorrt_section: TensorRT) -> Parity:
    """Parity of every engine that can run here, keyed by backend; a plan that cannot run says why."""
    from engines import tensorrt
    from engines.onnxruntime import OnnxRuntimeEngine

    log.info("verifying parity against the fp32 reference")
    reference, _ = load_checkpoint(folder, torch.float32)
    engines = [OnnxRuntimeEngine(tmp / ONNX_FILE, spec)]
    reports, unmeasured = {}, {}
    if tensorrt_section.built:
        why = tensorrt.plan_unusable_reason(tensorrt_section.plan)
        if why is None:
            engines.append(tensorrt.TensorRTEngine(tmp, spec, tensorrt_section.plan))
        else:
            log.warning("TensorRT plan not verified: %s", why)
            unmeasured["tensorrt"] = why
    for engine in engines:
        report = parity.measure(reference, engine)
        print(parity.format_table(report))
        if not report["passed"]:
            failed = ", ".join(r["output"] for r in report["rows"] if not r["passed"])
            raise ExportError(f"{engine.backend} parity check failed ({failed}) past the {spec.dtype} tolerance; "
                              "nothing was written. Use --skip-verify to write the artifact anyway (recorded in "
                              "its manifest).")
        reports[engine.backend] = report
    return Parity(reports=reports, unmeasured=unmeasured)


def _write_manifest(tmp: Path, sections: dict, build_info: Build) -> None:
    paths = sorted(p for p in tmp.iterdir() if p.is_file())
    hashes = _hash_files(paths, "hashing the artifact")
    files = {p.name: FileEntry(sha256=hashes[p.name], bytes=p.stat().st_size) for p in paths}
    manifest = Manifest(**sections, build=build_info, files=files)
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def _hash_files(paths: list[Path], desc: str) -> dict[str, str]:
    with tqdm(total=sum(p.stat().st_size for p in paths), desc=desc, unit="B", unit_scale=True, disable=None,
              leave=False) as bar:
        return {p.name: sha256_file(p, bar.update) for p in paths}


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing artifact is swapped out, then removed."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{int(time.time())}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


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

"""The artifact folder: the contract between ``export`` (which writes it) and every runtime (which reads it).

``manifest.json`` is a ``Manifest``: typed sections that export fills and everyone reads as attributes. It names
every file in the folder with its sha256; ``Artifact.open`` checks them all once, so a changed, truncated or
missing file is refused before anything runs, and no engine hashes a file again.

A manifest is input like any other: every field is checked against its declared type on read, and every file it
names must be a plain file name inside the folder. A malformed manifest is an ``ArtifactError`` naming the field,
never a KeyError from deep inside a runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path

from .base import GraphSpec
from .memory import MemoryPlan

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


class ArtifactError(ValueError):
    """An artifact folder that cannot be used as it is; the message names the file or field."""


def sha256_file(path: Path, progress: Callable[[int], object] | None = None, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks; ``progress(n)`` is told of every ``n`` bytes read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def plain_file_name(name: object, where: str) -> str:
    """``name`` if it names a file directly inside a folder (no separators, no ``..``); else ArtifactError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ArtifactError(f"{where}: {name!r} is not a plain file name inside the artifact folder")
    return name


# --------------------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoint the artifact was exported from."""

    model: str  # what the user named: a preset, a folder or a hub id
    folder: str  # the local checkpoint folder it resolved to
    files: dict[str, str]  # checkpoint file name -> sha256


@dataclasses.dataclass(frozen=True)
class Graph:
    """The ONNX graph: its file, opset, and the IO every engine binds (declared by ``spec``).

    ``onnx_file`` is the portable form TensorRT builds from and ONNX Runtime's CUDA provider runs;
    ``onnxruntime_cpu_file``, where present, the same graph with its attention as ONNX Runtime's
    GroupQueryAttention (same IO, same external data file), which ONNX Runtime's CPU provider runs instead."""

    spec: GraphSpec
    opset: int
    onnx_file: str
    inputs: dict[str, dict]  # name -> {"shape": [...], "dtype": str}
    outputs: dict[str, dict]
    onnxruntime_cpu_file: str | None = None


@dataclasses.dataclass(frozen=True)
class TensorRTPlan:
    """A built TensorRT plan and what it was built with and for."""

    module: str  # "tensorrt" or "tensorrt_rtx"
    version: str
    gpu: dict | None  # {"name", "compute_capability"} of the build machine; None for an offline TRT-RTX build
    compute_capability_targets: list | str | None
    profiles: list[dict]  # [{"name", "shapes": {input: {"min", "opt", "max"}}}], in profile index order
    native_layers: dict[str, int]
    attention_decomposable: bool
    plan_file: str
    plan_sha256: str
    build_log_file: str
    timing_cache_file: str | None
    build_seconds: float


@dataclasses.dataclass(frozen=True)
class TensorRT:
    """Whether the artifact holds a plan: ``plan`` when built, else ``reason`` says why not."""

    plan: TensorRTPlan | None = None
    reason: str | None = None

    @property
    def built(self) -> bool:
        return self.plan is not None


@dataclasses.dataclass(frozen=True)
class Parity:
    """Parity measured at build time: one report per backend that ran (``export.parity``'s JSON-ready report),
    backends that could not run with why, or why nothing was measured."""

    reports: dict[str, dict] = dataclasses.field(default_factory=dict)
    unmeasured: dict[str, str] = dataclasses.field(default_factory=dict)  # backend -> why it did not run
    skipped: str | None = None  # why verification did not run at all (--skip-verify)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the graph's projections (``reference/quantize.py`` defines the numbers):
    symmetric ``bits``-bit integers with one ``scale_dtype`` scale per ``block_size`` inputs of each output."""

    method: str  # "rtn": round to nearest
    bits: int
    block_size: int
    scale_dtype: str
    weights: list[str]  # the checkpoint tensors whose products use quantized weights ("lm_head" for the head)
    # ONNX Runtime CPU's session.qdq_matmulnbits_accuracy_level, the precision of the activations inside its fused
    # MatMulNBits kernels: 1 keeps them fp32, 4 quantizes them to int8 (faster). Parity was measured at this level.
    onnxruntime_accuracy_level: int

    def __post_init__(self):
        if self.bits not in (4, 8) or self.block_size not in (32, 64, 128) or self.onnxruntime_accuracy_level not in (
                1, 4):
            raise ValueError(f"bits {self.bits}, block_size {self.block_size}, onnxruntime_accuracy_level "
                             f"{self.onnxruntime_accuracy_level}: expected bits 4 or 8, block size 32, 64 or 128, "
                             "accuracy level 1 or 4")


@dataclasses.dataclass(frozen=True)
class Build:
    seconds: float
    weight_bytes: int
    peak_rss_bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int
    created: str
    source: Source
    config: dict  # the model's CohereConfig, as CohereConfig.to_dict() writes it
    graph: Graph
    tensorrt: TensorRT
    parity: Parity
    build: Build
    memory: MemoryPlan  # what the artifact needs where it runs, as export planned and checked it
    tools: dict[str, str]
    files: dict[str, FileEntry]  # every file of the folder but the manifest itself
    quantization: Quantization | None = None  # None: the weights are in the graph's dtype

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, raw: object, where: str = MANIFEST) -> "Manifest":
        """Parse and type-check a manifest; errors name the field (``graph.spec.max_context``)."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected a JSON object, found {type(raw).__name__}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {version!r}; this release reads {FORMAT_VERSION}. "
                                "Re-export with this release.")
        manifest = _parse(cls, raw, where)
        for name in manifest.files:
            plain_file_name(name, f"{where}: files")
        named = [("graph.onnx_file", manifest.graph.onnx_file)]
        if manifest.graph.onnxruntime_cpu_file is not None:
            named.append(("graph.onnxruntime_cpu_file", manifest.graph.onnxruntime_cpu_file))
        if manifest.tensorrt.built:
            plan = manifest.tensorrt.plan
            named += [(f"tensorrt.plan.{field}", getattr(plan, field)) for field in (
                "plan_file", "build_log_file", "timing_cache_file") if getattr(plan, field) is not None]
        for field, name in named:
            if plain_file_name(name, f"{where}: {field}") not in manifest.files:
                raise ArtifactError(f"{where}: {field} names {name!r}, which the files section does not list")
        _check_graph(manifest.graph, manifest.config, where)
        return manifest


# The model config fields the graph's spec is derived from (export: GraphSpec from CohereConfig).
_SPEC_FROM_CONFIG = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads",
                     "vocab_size": "vocab_size"}


def _check_graph(graph: Graph, config: dict, where: str) -> None:
    """The graph section must be what its spec declares and agree with the model config it was exported from."""
    spec = graph.spec
    for field, config_field in _SPEC_FROM_CONFIG.items():
        if config.get(config_field) != getattr(spec, field):
            raise ArtifactError(f"{where}: graph.spec.{field} {getattr(spec, field)!r} disagrees with "
                                f"config.{config_field} {config.get(config_field)!r}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (type(hidden) is int and type(heads) is int and heads > 0 and hidden // heads == spec.head_dim):
        raise ArtifactError(f"{where}: graph.spec.head_dim {spec.head_dim} disagrees with config.hidden_size "
                            f"{hidden!r} / config.num_attention_heads {heads!r}")
    declared = spec.io()
    for section in ("inputs", "outputs"):
        written, expected = getattr(graph, section), declared[section]
        for name in sorted(set(written) | set(expected)):
            if written.get(name) != expected.get(name):
                raise ArtifactError(f"{where}: graph.{section}.{name} is {written.get(name)!r}; the graph's spec "
                                    f"declares {expected.get(name)!r}")


# ------------------------------------------------------------------------------------------ JSON, type-checked


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _parse(kind, raw, where: str):
    """``raw`` (parsed JSON) as ``kind``: a dataclass, ``X | None``, ``dict[str, X]``, ``list[X]``, or a scalar."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if raw is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _parse(option, raw, where)
            except ArtifactError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ArtifactError(errors[0])
        raise ArtifactError(f"{where}: {raw!r:.80} is none of {' | '.join(map(_name, options))}")
    if dataclasses.is_dataclass(kind):
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected an object, found {type(raw).__name__}")
        hints = typing.get_type_hints(kind)
        values = {}
        for field in dataclasses.fields(kind):
            if field.name in raw:
                values[field.name] = _parse(hints[field.name], raw[field.name], f"{where}.{field.name}")
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{where}.{field.name} is missing")
        unknown = sorted(set(raw) - set(values) - {f.name for f in dataclasses.fields(kind)})
        if unknown:
            raise ArtifactError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return kind(**values)
        except (TypeError, ValueError) as e:  # the dataclass's own checks (GraphSpec bounds)
            raise ArtifactError(f"{where}: {e}") from None
    if origin is list:
        if not isinstance(raw, list):
            raise ArtifactError(f"{where}: expected a list, found {type(raw).__name__}")
        [item] = typing.get_args(kind)
        return [_parse(item, value, f"{where}[{i}]") for i, value in enumerate(raw)]
    if origin is dict:
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected an object, found {type(raw).__name__}")
        _, item = typing.get_args(kind)
        return {key: _parse(item, value, f"{where}.{key}") for key, value in raw.items()}
    if kind is dict or kind is list:
        if not isinstance(raw, kind):
            raise ArtifactError(f"{where}: expected {'an object' if kind is dict else 'a list'}, found "
                                f"{type(raw).__name__}")
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ArtifactError(f"{where}: expected a number, found {raw!r:.80}")
        return float(raw)
    if kind in (int, str, bool):
        if type(raw) is not kind:
            raise ArtifactError(f"{where}: expected {_name(kind)}, found {raw!r:.80}")
        return raw
    raise TypeError(f"manifest field type {kind!r} has no parser")  # a bug here, not in the file


def _name(kind) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", float: "a number",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


# ---------------------------------------------------------------------------------------------------- the folder


@dataclasses.dataclass(frozen=True)
class Artifact:
    folder: Path
    manifest: Manifest

    @property
    def spec(self) -> GraphSpec:
        return self.manifest.graph.spec

    def path(self, name: str) -> Path:
        """The path of a file the manifest lists (and ``open`` verified)."""
        if name not in self.manifest.files:
            raise ArtifactError(f"{self.folder / MANIFEST} lists no file {name!r}")
        return self.folder / name

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "Artifact":
        """Read and type-check the manifest and (with ``verify``) every listed file's size and sha256."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not a folder; pass the artifact folder that `python -m export` wrote")
        if manifest_path.is_symlink():
            raise ArtifactError(f"{manifest_path}: a symlink; an artifact's manifest is a plain file in its folder")
        try:
            raw = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{folder}: no {MANIFEST}; is this an artifact folder written by "
                                "`python -m export`?") from None
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of over 4300 digits, deep nesting
            raise ArtifactError(f"{manifest_path}: not valid JSON ({type(e).__name__}: {e})") from None
        manifest = Manifest.from_dict(raw, str(manifest_path))
        if verify:
            for name, entry in manifest.files.items():
                path = folder / name
                if path.is_symlink() or not path.is_file():
                    raise ArtifactError(f"{path}: listed in {MANIFEST} but missing (or not a plain file)")
                if path.stat().st_size != entry.bytes:
                    raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry.bytes}; "
                                        "the file was changed or truncated. Re-export.")
                if sha256_file(path) != entry.sha256:
                    raise ArtifactError(f"{path}: sha256 differs from {MANIFEST}; the file was changed. Re-export.")
        return cls(folder, manifest)

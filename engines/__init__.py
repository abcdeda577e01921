"""Runtimes behind one small interface (``engines.base.Engine``); they know tensors, not tokenizers."""

from __future__ import annotations

import logging

from .artifact import Artifact, ArtifactError
from .base import Engine, EngineError, GraphSpec

__all__ = ["Artifact", "ArtifactError", "Engine", "EngineError", "GraphSpec", "open_engine",
           "tensorrt_unusable_reason", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")


def open_engine(artifact: Artifact, backend: str = "auto") -> Engine:
    """The engine for ``artifact``. ``auto``: TensorRT when the artifact holds a plan this machine can run,
    else ONNX Runtime on CUDA when available, else on CPU. The reason for each fallback is logged."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        why = tensorrt_unusable_reason(artifact)
        if why is None:
            from . import tensorrt

            return tensorrt.TensorRTEngine(artifact.folder, artifact.spec, artifact.manifest.tensorrt.plan)
        if backend == "tensorrt":
            raise EngineError(f"backend 'tensorrt': {why}")
        log.info("not using TensorRT: %s", why)
    from .onnxruntime import OnnxRuntimeEngine

    device = {"onnxruntime-cpu": "cpu", "onnxruntime-cuda": "cuda"}.get(backend, "auto")
    return OnnxRuntimeEngine.from_artifact(artifact, device)


def tensorrt_unusable_reason(artifact: Artifact) -> str | None:
    """Why ``open_engine`` cannot run ``artifact`` on TensorRT here (no plan, another GPU or TensorRT version), or
    None when it can."""
    section = artifact.manifest.tensorrt
    if not section.built:
        return "the artifact holds no TensorRT plan" + (f" ({section.reason})" if section.reason else "")
    from . import tensorrt  # only now: the TensorRT runtime imports torch, its device allocator

    return tensorrt.plan_unusable_reason(section.plan)

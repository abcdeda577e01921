"""The reference PyTorch Cohere model: config, presets, checkpoint loading. The source of truth for numerics."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import ModelNotFoundError, resolve_checkpoint
from .config import CohereConfig, ConfigError
from .model import CohereForCausalLM
from .presets import DEFAULT_MODEL, PRESETS
from .weights import CheckpointError, check_checkpoint, load_weights

__all__ = ["load_model", "load_checkpoint", "resolve_checkpoint", "CohereConfig", "CohereForCausalLM",
           "ConfigError", "CheckpointError", "ModelNotFoundError", "PRESETS", "DEFAULT_MODEL"]

log = logging.getLogger(__name__)


def load_model(model: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
               ) -> tuple[CohereForCausalLM, CohereConfig]:
    """Load a preset name, a checkpoint folder or a hub id as an eval-mode model in ``dtype``.

    ``model(input_ids)`` then returns fp32 logits ``[batch, seq, vocab]`` for every position.
    """
    return load_checkpoint(resolve_checkpoint(str(model)), dtype)


def load_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[CohereForCausalLM, CohereConfig]:
    config = CohereConfig.from_json_file(folder / "config.json")
    files = check_checkpoint(folder, config)  # headers only, before the model is built: a wrong config fails fast
    with torch.device("meta"):
        model = CohereForCausalLM(config)
    load_weights(model, files, dtype)
    log.debug("loaded %s (%s) from %s", type(model).__name__, dtype, folder)
    return model.eval().requires_grad_(False), config

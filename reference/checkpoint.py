"""Turn what a user names (a preset, a local folder, a hub id) into a local HF-format checkpoint folder.

Hub downloads go through ``huggingface_hub``, so ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE=1`` behave as
users expect, and a warm cache works with no network. The built-in ``tiny`` checkpoint is generated from a
seed into a local cache folder, through the same files a real checkpoint has; ``tiny-trained`` ships as package
data (reference/tiny_trained/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from .config import CohereConfig
from .model import CohereForCausalLM
from .presets import PRESETS, TINY_SEED
from .weights import CheckpointError, save_checkpoint

log = logging.getLogger(__name__)

# What a deployment needs from a hub repo: never pickled weights, never the repo's other files.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
TINY_ASSETS = ("tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFoundError(ValueError):
    """The name is no preset, no local folder and no reachable hub repo; the message says what to do."""


def resolve_checkpoint(model: str) -> Path:
    """A local checkpoint folder for a preset name, a local folder or a hub id."""
    folder = _resolve(model)
    check_links(folder)
    return folder


def check_links(folder: Path) -> None:
    """Refuse a checkpoint whose files are symlinks to somewhere else than the folder itself or, for a hub cache
    snapshot (``models--owner--name/snapshots/<commit>``), its repo folder, where huggingface_hub keeps the files
    (``../../blobs/<hash>``). What export reads is copied into a shared artifact: a link out of the checkpoint
    (to ``~/.ssh``, another model) is refused rather than followed, as git refuses to follow symlinks out of a
    work tree."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent.resolve())
    for path in sorted(folder.iterdir()):
        if not path.is_symlink():
            continue
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise CheckpointError(f"{path}: a symlink to {target}, outside the checkpoint folder; copy the file "
                                  "into the folder instead")


def _resolve(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {model!r} is a file; pass a checkpoint folder (with config.json and "
                                 "*.safetensors), a preset name or a hub id")
    if model == "tiny":
        return tiny_checkpoint()
    if model == "tiny-trained":
        return tiny_trained_checkpoint()
    if model in PRESETS:
        preset = PRESETS[model]
        if not preset.verified:
            log.warning("preset %s: its published hyper-parameters are unverified (%s); the checkpoint's own "
                        "config.json is used", model, preset.note)
        return download(preset.hub_id)
    if _HUB_ID.match(model):
        return download(model)
    raise ModelNotFoundError(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), not a folder, and not a "
                             "hub id of the form owner/name")


def download(repo_id: str) -> Path:
    """The snapshot of ``repo_id`` in the HF cache, downloaded if needed (config, safetensors, tokenizer)."""
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    local_hint = (f"Download it elsewhere (huggingface-cli download {repo_id}) and pass the folder instead: "
                  "--model /path/to/checkpoint")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN, or pass a "
                                 "local folder with --model") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such hub repo (or it is private and HF_TOKEN is not set)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelNotFoundError(
            f"{repo_id} is not in the local hub cache ({huggingface_hub.constants.HF_HUB_CACHE}) and "
            + ("HF_HUB_OFFLINE is set. " if offline else "the hub cannot be reached. ") + local_hint) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"{repo_id}: download failed ({e}). {local_hint}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("COHERE_DEPLOY_CACHE", Path.home() / ".cache" / "cohere-deploy"))


def tiny_checkpoint() -> Path:
    """The built-in ``tiny`` checkpoint folder, generated on first use; its name hashes everything it holds."""
    assets = {name: resources.files("reference.tiny").joinpath(name).read_bytes() for name in TINY_ASSETS}
    config = PRESETS["tiny"].config
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode() + str(TINY_SEED).encode()
                            + b"".join(assets.values())).hexdigest()[:12]
    folder = cache_dir() / f"tiny-{digest}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        save_checkpoint(tiny_model(config), tmp)
        for name, data in assets.items():
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first: theirs is identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated the built-in tiny checkpoint in %s", folder)
    return folder


def tiny_trained_checkpoint() -> Path:
    """The built-in ``tiny-trained`` checkpoint: package data, read where it is installed (export and serve only
    read a checkpoint)."""
    folder = Path(__file__).resolve().parent / "tiny_trained"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: the tiny-trained checkpoint is missing from this installation; reinstall "
                              f"the package, or rebuild it with tools/train_tiny_trained.py --out {folder}")
    return folder


def tiny_model(config: CohereConfig) -> CohereForCausalLM:
    """Seeded random weights with realistic scales: unit-variance embeddings, 1/sqrt(fan_in) matrices, norm
    weights near 1 (not exactly 1, so a norm that drops its weight shows up in parity tests)."""
    generator = torch.Generator().manual_seed(TINY_SEED)
    model = CohereForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5)
    return model.eval()

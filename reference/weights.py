"""Load HF safetensors checkpoints (one file or shards) into the reference model, one tensor at a time.

The model is built on the ``meta`` device and each parameter is materialised straight from the memory-mapped
file in the target dtype, so a load never holds two copies of the weights. Pickled checkpoints (``.bin``,
``.pt``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .model import CohereForCausalLM


# safetensors dtype codes of the weights this loader converts exactly; an int8 or fp8 tensor is a quantized
# checkpoint, which casting to float would silently corrupt.
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder this project refuses, naming the file or tensor at fault."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in set(weight_map.values()):
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {folder}")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{index} names shard {shard.name}, which is missing from {folder}")
        return files
    if single.exists():
        return {name: single for name in _tensor_names(single)}
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); they are refused because unpickling "
            "runs arbitrary code. Convert them to safetensors first (transformers: "
            "model.save_pretrained(out, safe_serialization=True)).")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: CohereForCausalLM, folder: Path, dtype: torch.dtype) -> None:
    """Fill a meta-device ``model`` from the checkpoint in ``folder``, converting each tensor to ``dtype``."""
    files = checkpoint_files(folder)
    expected = {name: p.shape for name, p in model.named_parameters()}
    # A tied checkpoint may still carry a copy of lm_head (some exporters write one): ignore it, it is the
    # embedding. An untied model needs its own.
    names = set(files) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    missing = sorted(set(expected) - names)
    unexpected = sorted(n for n in names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                              + " (is config.json from the same checkpoint?)")

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    # A progress bar on a terminal only (disable=None): a 70 GB checkpoint takes minutes to read.
    progress = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=None, leave=False)
    for path, tensor_names in by_file.items():
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        with handle as f:
            for name in tensor_names:
                stored = f.get_slice(name).get_dtype()
                if stored not in FLOAT_DTYPES:
                    raise CheckpointError(f"{path.name}: tensor {name} is stored as {stored}; this loader reads "
                                          f"{', '.join(FLOAT_DTYPES.values())} weights only (quantized checkpoints "
                                          "are not supported)")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise CheckpointError(f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                                          f"needs {tuple(expected[name])}")
                _set_parameter(model, name, tensor.to(dtype))
                del tensor
                progress.update()
    progress.close()


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))


def save_checkpoint(model: CohereForCausalLM, folder: Path) -> None:
    """Write ``model`` as an HF-format checkpoint folder (config.json, generation_config.json, model.safetensors),
    as transformers' save_pretrained does."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = {"architectures": ["CohereForCausalLM"], "model_type": "cohere",
                 **{k: v for k, v in c.to_dict().items()}, "hidden_act": "silu",
                 "torch_dtype": str(model.dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(c.generation_config(), indent=2) + "\n")
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})

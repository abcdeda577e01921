"""Load HF safetensors checkpoints (one file or shards) into the reference model, one tensor at a time.

First the safetensors headers alone (tensor names, shapes, dtypes) are checked against the config
(``check_checkpoint``), so a mismatched config.json fails in seconds. Then the model is built on the ``meta`` device
and each parameter is materialised straight from the memory-mapped file in the target dtype, so a load never holds
two copies of the weights; a tensor that is not finite there is refused by name. Pickled checkpoints (``.bin``,
``.pt``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import CohereConfig
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
    with _open(path) as f:
        return list(f.keys())


def expected_tensors(config: CohereConfig) -> dict[str, tuple[str, ...]]:
    """Every parameter ``CohereForCausalLM(config)`` has, in the model's order, with its shape as the names of the
    config quantities it is made of (``("vocab_size", "hidden_size")``); ``config_dims`` gives their values.

    Computed from the config alone because building the model, even on the ``meta`` device, takes minutes for a
    config that claims 100000 layers; a test checks this table against the model's ``named_parameters``.
    """
    hidden, inter = "hidden_size", "intermediate_size"
    q, kv = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    table = {"model.embed_tokens.weight": ("vocab_size", hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        table |= {f"{layer}.input_layernorm.weight": (hidden,),
                  f"{layer}.self_attn.q_proj.weight": (q, hidden),
                  f"{layer}.self_attn.k_proj.weight": (kv, hidden),
                  f"{layer}.self_attn.v_proj.weight": (kv, hidden),
                  f"{layer}.self_attn.o_proj.weight": (hidden, q)}
        if config.use_qk_norm:
            table |= {f"{layer}.self_attn.q_norm.weight": ("num_attention_heads", "head_dim"),
                      f"{layer}.self_attn.k_norm.weight": ("num_key_value_heads", "head_dim")}
        table |= {f"{layer}.mlp.gate_proj.weight": (inter, hidden),
                  f"{layer}.mlp.up_proj.weight": (inter, hidden),
                  f"{layer}.mlp.down_proj.weight": (hidden, inter)}
    table["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = ("vocab_size", hidden)
    return table


def config_dims(config: CohereConfig) -> dict[str, int]:
    """The values of the quantities ``expected_tensors`` names."""
    c = config
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "num_attention_heads * head_dim": c.num_attention_heads * c.head_dim,
            "num_key_value_heads * head_dim": c.num_key_value_heads * c.head_dim}


def check_checkpoint(folder: Path, config: CohereConfig) -> dict[str, Path]:
    """Check the checkpoint's tensor names, shapes and dtypes against what ``config`` implies, reading only the
    safetensors headers, and return which file holds each tensor to load (in the model's order).

    No tensor is read and no model is built, so a config.json that does not belong to its weights (100000 layers,
    a wrong hidden_size) is refused in seconds, naming the first tensor at fault, rather than after minutes of
    allocation.
    """
    files = checkpoint_files(folder)
    expected = expected_tensors(config)
    # A tied checkpoint may still carry a copy of lm_head (some exporters write one): ignore it, it is the
    # embedding. An untied model needs its own.
    names = set(files) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing = [name for name in expected if name not in names]
    unexpected = sorted(n for n in names - expected.keys() if not n.endswith("rotary_emb.inv_freq"))
    for kind, at_fault, question in (
            ("missing", missing, "is the checkpoint complete, and config.json from the same checkpoint?"),
            ("unexpected", unexpected, "is config.json from the same checkpoint?")):
        if at_fault:
            raise CheckpointError(f"{folder}: {kind} tensor(s) {', '.join(at_fault[:5])}"
                                  + (f" and {len(at_fault) - 5} more" if len(at_fault) > 5 else "")
                                  + f"{_layer_count_hint(files, config)}; {question}")

    dims = config_dims(config)
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, tensor_names in by_file.items():
        with _open(path) as f:
            for name in tensor_names:
                header = f.get_slice(name)
                stored = header.get_dtype()
                if stored not in FLOAT_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} is stored as {stored}; this loader reads "
                                          f"{', '.join(FLOAT_DTYPES.values())} weights only (quantized checkpoints "
                                          "are not supported)")
                shape, needed = tuple(header.get_shape()), tuple(dims[d] for d in expected[name])
                if shape != needed:
                    raise CheckpointError(f"{path}: tensor {name} has shape {shape}, config.json implies {needed} "
                                          f"= ({', '.join(expected[name])}); is config.json from the same "
                                          "checkpoint?")
    return {name: files[name] for name in expected}


def _layer_count_hint(files: dict[str, Path], config: CohereConfig) -> str:
    held = {match.group(1) for name in files if (match := re.match(r"model\.layers\.(\d+)\.", name))}
    if len(held) == config.num_hidden_layers:
        return ""
    return f" (the checkpoint holds {len(held)} layers, config.json says num_hidden_layers={config.num_hidden_layers})"


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: CohereForCausalLM, files: dict[str, Path], dtype: torch.dtype) -> None:
    """Fill a meta-device ``model`` with the tensors ``check_checkpoint`` approved (``files``), converting each to
    ``dtype``. A tensor holding NaN or infinity, or a value the conversion overflows to infinity, is refused by
    name: it would make every logit NaN, and an engine built from it would pass a parity check that compares NaN
    with NaN."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    # A progress bar on a terminal only (disable=None): a 70 GB checkpoint takes minutes to read.
    progress = tqdm(total=len(files), desc="loading weights", unit="tensor", disable=None, leave=False)
    for path, tensor_names in by_file.items():
        with _open(path) as f:
            for name in tensor_names:
                tensor = f.get_tensor(name)
                value = tensor.to(dtype)
                if not all_finite(value):
                    raise CheckpointError(non_finite_message(path, name, tensor, value))
                _set_parameter(model, name, value)
                del tensor
                progress.update()
    progress.close()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass that allocates nothing the tensor's size: min and max are NaN
    when any value is NaN, and ±inf when any is."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def non_finite_message(where: Path | str, name: str, stored: torch.Tensor, value: torch.Tensor) -> str:
    """Why ``value`` (``stored`` converted) is refused: NaN or infinity stored, or a conversion that overflows."""
    stored_dtype = str(stored.dtype).removeprefix("torch.")
    if not all_finite(stored):
        nan, inf = int(stored.isnan().sum()), int(stored.isinf().sum())
        return (f"{where}: tensor {name} holds {nan} NaN and {inf} infinite value(s) in its stored {stored_dtype}; "
                "the checkpoint is damaged (re-download or re-convert it)")
    target = str(value.dtype).removeprefix("torch.")
    overflowing = int(value.isinf().sum())
    largest = float(stored.abs().max())
    return (f"{where}: tensor {name} ({stored_dtype}) holds {overflowing} value(s) that overflow {target} (largest "
            f"|value| {largest:.4g}, {target} holds up to {torch.finfo(value.dtype).max:.4g}); export it in "
            "float32 instead")


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

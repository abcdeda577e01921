"""The typed config of a Cohere (``CohereForCausalLM``) checkpoint, read from its ``config.json``.

Only fields that change the math are kept. Anything this project cannot run exactly (another architecture,
Cohere2's sliding-window layers, rope scaling) is refused here, with the field and value named, rather than
computed wrongly later.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class ConfigError(ValueError):
    """A config.json this project refuses, with the field and value that made it refuse."""


@dataclasses.dataclass(frozen=True)
class CohereConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    logit_scale: float
    layer_norm_eps: float = 1e-5
    use_qk_norm: bool = False
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int = 5
    eos_token_id: int = 255001
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        def need(ok: bool, field: str, why: str):
            if not ok:
                raise ConfigError(f"config field '{field}' = {getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
                 "must be a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "hidden_size",
             f"gives head_dim={self.head_dim}; rotary embedding needs an even head_dim")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        for field in ("rope_theta", "logit_scale", "layer_norm_eps"):
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, field,
                 "must be a positive number")
        need(not self.attention_bias, "attention_bias",
             "no released Cohere checkpoint has attention biases; this project does not run them")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def generation_config(self) -> dict:
        """generation_config.json as transformers derives it from config.json when a checkpoint has none."""
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "CohereConfig":
        """Build from a checkpoint's config.json dict; errors name the field, the value and ``source``."""
        try:
            return cls(**_fields_from_hf(raw))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "CohereConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there; a checkpoint folder needs one") from None
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of over 4300 digits, deep nesting
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))


# Keys of Cohere2 (Command R7B / Command A) configs: their sliding-window layers and NoPE global layers are not
# the `cohere` architecture, whatever else the config says.
_SLIDING_WINDOW_KEYS = ("sliding_window", "sliding_window_pattern", "layer_types", "cache_implementation")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "logit_scale")


def _fields_from_hf(raw: dict) -> dict:
    model_type = raw.get("model_type")
    if model_type != "cohere":
        raise ConfigError(
            f"config field 'model_type' = {model_type!r}: only 'cohere' (CohereForCausalLM) is supported"
            + (" ; Cohere2 (Command R7B / Command A) has sliding-window layers this project does not run"
               if model_type == "cohere2" else ""))
    architectures = raw.get("architectures")
    if architectures is not None and architectures != ["CohereForCausalLM"]:
        raise ConfigError(f"config field 'architectures' = {architectures!r}: expected ['CohereForCausalLM']")
    for key in _SLIDING_WINDOW_KEYS:
        if raw.get(key) not in (None, False):
            raise ConfigError(f"config field '{key}' = {raw[key]!r}: sliding-window attention is Cohere2's, "
                              "not supported")
    for key in _REQUIRED:
        if key not in raw:
            raise ConfigError(f"config field '{key}' is missing")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field 'hidden_act' = {raw['hidden_act']!r}: only 'silu' is supported")

    rope_theta = _rope_theta(raw)
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads")
    out = dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        rope_theta=rope_theta,
        logit_scale=raw["logit_scale"],
    )
    for key in ("layer_norm_eps", "use_qk_norm", "tie_word_embeddings", "attention_bias",
                "max_position_embeddings", "bos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):  # transformers allows a list; the first is the end-of-turn token
        eos = eos[0] if eos else None
    if eos is not None:
        out["eos_token_id"] = eos
    return out


def _rope_theta(raw: dict) -> float:
    """rope_theta from the hub's top-level key, or from newer transformers' ``rope_parameters``."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if scaling not in (None, {}):
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type != "default":
            raise ConfigError(f"config field 'rope_scaling' = {scaling!r}: only unscaled (default) rotary "
                              "embeddings are supported")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"config field 'rope_parameters' = {params!r}: expected an object")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"config field 'rope_parameters.rope_type' = {rope_type!r}: only 'default' "
                              "(unscaled) rotary embeddings are supported")
        if "rope_theta" in params:
            return params["rope_theta"]
    if "rope_theta" in raw:
        return raw["rope_theta"]
    raise ConfigError("config field 'rope_theta' is missing (neither at top level nor in 'rope_parameters')")

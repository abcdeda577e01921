"""Named checkpoints of the Cohere family, from their published hyper-parameters.

A preset says which hub repo to download and what its config is believed to be. The ``config.json`` that comes
with the weights always wins: the preset config is only used for ``tiny`` (which has no download) and to show a
user what a name means before downloading. ``verified=False`` marks rows that come from memory or a single
secondary source and have not been checked against the real config.json.
"""

from __future__ import annotations

import dataclasses

from .config import CohereConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None  # None: built in, generated locally
    config: CohereConfig
    verified: bool
    note: str = ""


def _cfg(hidden, layers, heads, kv_heads, inter, theta, logit_scale, qk_norm=False, **kw) -> CohereConfig:
    return CohereConfig(vocab_size=kw.pop("vocab_size", 256000), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                        rope_theta=theta, logit_scale=logit_scale, use_qk_norm=qk_norm, **kw)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("command-r", "CohereForAI/c4ai-command-r-v01",
           _cfg(8192, 40, 64, 64, 22528, 8_000_000.0, 0.0625), verified=True,
           note="35B, MHA; CohereConfig defaults plus a secondary source"),
    Preset("command-r-08-2024", "CohereForAI/c4ai-command-r-08-2024",
           _cfg(8192, 40, 64, 8, 24576, 4_000_000.0, 0.0625), verified=False,
           note="32B, GQA; max_position_embeddings and dtype unknown"),
    Preset("command-r-plus", "CohereForAI/c4ai-command-r-plus",
           _cfg(12288, 64, 96, 8, 33792, 75_000_000.0, 0.8333333333333334, qk_norm=True), verified=True,
           note="104B, qk-norm"),
    Preset("command-r-plus-08-2024", "CohereForAI/c4ai-command-r-plus-08-2024",
           _cfg(12288, 64, 96, 8, 33792, 75_000_000.0, 0.8333333333333334, qk_norm=True), verified=False,
           note="assumed equal to command-r-plus, including qk-norm: unverified"),
    Preset("aya-23-8b", "CohereForAI/aya-23-8B",
           _cfg(4096, 32, 32, 8, 14336, 10_000.0, 0.0625), verified=True),
    Preset("aya-23-35b", "CohereForAI/aya-23-35B",
           _cfg(8192, 40, 64, 64, 22528, 8_000_000.0, 0.0625), verified=False,
           note="assumed the shape of command-r v01: unverified"),
    Preset("aya-expanse-8b", "CohereForAI/aya-expanse-8b",
           _cfg(4096, 32, 32, 8, 14336, 10_000.0, 0.125), verified=True, note="logit_scale 0.125"),
    Preset("aya-expanse-32b", "CohereForAI/aya-expanse-32b",
           _cfg(8192, 40, 64, 8, 24576, 4_000_000.0, 0.0625), verified=True,
           note="max_position_embeddings unverified"),
    # The built-in default: a few MB, seeded random weights, a small byte-level BPE tokenizer with Cohere's
    # special tokens (ids from reference/tiny/tokenizer.json) and this project's own chat templates on Cohere's
    # turn tokens (docs/chat-templates.md). It exercises GQA and qk-norm so the whole pipeline's hardest paths run
    # on a fresh machine.
    Preset("tiny", None,
           _cfg(128, 2, 4, 2, 256, 10_000.0, 0.0625, qk_norm=True, vocab_size=1024, max_position_embeddings=4096,
                bos_token_id=5, eos_token_id=9, pad_token_id=0), verified=True,
           note="built in: seeded random weights, no download"),
    # A built-in model that has learned something: the same special tokens and chat templates as `tiny`, trained
    # for ~10 minutes on Python's own documentation (pydoc_data.topics) by tools/train_tiny_trained.py and shipped
    # in reference/tiny_trained/ as float16, so a quantization or kernel that hurts the math shows as worse
    # perplexity and text.
    Preset("tiny-trained", None,
           _cfg(256, 4, 8, 2, 768, 10_000.0, 0.0625, qk_norm=True, vocab_size=3072, max_position_embeddings=4096,
                bos_token_id=5, eos_token_id=9, pad_token_id=0), verified=True,
           note="built in: trained on Python's documentation, no download"),
]}

DEFAULT_MODEL = "tiny"
TINY_SEED = 0

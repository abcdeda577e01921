"""Shared fixtures: random-weight Cohere checkpoints saved by HF transformers, and the tiny artifact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Cohere's published chat templates and hyper-parameter table, beside the repository in CI (X/<repo>, X/shared).
# Only the tests that compare with them read it; everything else, the package above all, stands without it.
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"needs ../shared (Cohere's published templates and hyper-parameter table); {SHARED} is absent in "
           "this clone",
)

# Configs that exercise every branch of the math: MHA and GQA, with and without qk-norm, tied and untied
# embeddings, and an odd head count (3 query heads sharing 1 kv head).
CONFIGS = {
    "mha-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, use_qk_norm=False,
                     tie_word_embeddings=True, logit_scale=0.0625),
    "gqa-qknorm": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True,
                       tie_word_embeddings=True, logit_scale=0.8333333333333334),
    "gqa-untied": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, use_qk_norm=False,
                       tie_word_embeddings=False, logit_scale=0.125),
    "odd-heads-qknorm-untied": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                    use_qk_norm=True, tie_word_embeddings=False, logit_scale=0.25),
}


def hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=211, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512,
                rope_theta=10000.0, bos_token_id=5, eos_token_id=6, pad_token_id=0)
    return transformers.CohereConfig(**{**base, **overrides})


def save_hf_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight CohereForCausalLM written by transformers' own save_pretrained (the oracle's format)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.CohereForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():  # HF's init is near-zero; larger weights make every op matter in the comparison
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() == 2 and "embed" not in name else 1.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The tiny checkpoint and anything else cached goes into a per-run folder, never the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COHERE_DEPLOY_CACHE", str(tmp_path_factory.mktemp("cohere-deploy-cache")))
    yield
    mp.undo()


def export_tiny(out: Path, *options: str, **run) -> Path:
    """`python -m export --model tiny --engine onnx` into ``out`` with more ``options``; fails the test if it fails."""
    subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--out", str(out), "--engine", "onnx",
                    *options], check=True, cwd=REPO, **run)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """`python -m export --model tiny` as a newcomer runs it (fp32, ONNX), once per test run."""
    return export_tiny(tmp_path_factory.mktemp("artifacts") / "tiny-float32", "--max-batch", "4", "--max-context",
                       "256")

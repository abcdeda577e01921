"""The built-in `tiny-trained` model: its training tool's rotation equals the reference's, the shipped checkpoint
resolves, loads and has learned its corpus, and the corpus split is deterministic and disjoint. Nothing is trained
here."""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import reference.model
from reference import PRESETS, CohereConfig, load_model, resolve_checkpoint
from reference.corpus import pydoc_text, pydoc_topics

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "reference" / "tiny_trained"
# The opening of the "with" topic (trained on). After a bare title ("The with statement") the model, trained for
# 200 steps only, first emits a run of newlines, as a title line is followed by its underline in the corpus.
PROMPT = 'The "with" statement is used to'


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_tiny_trained
    finally:
        sys.path.remove(str(REPO / "tools"))
    return train_tiny_trained


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-trained")[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_twin_equals_the_reference(tool, dtype):
    config = PRESETS["tiny-trained"].config
    generator = torch.Generator().manual_seed(1)
    cos, sin = reference.model.rotary_tables(config, config.max_position_embeddings)
    x = torch.randn(3, config.num_attention_heads, 17, config.head_dim, generator=generator).to(dtype)
    positions = torch.randint(0, config.max_position_embeddings, (3, 17), generator=generator)  # any order
    expected = reference.model.rotary_embedding(x, cos, sin, positions)
    got = tool.rotary_embedding_twin(x, cos, sin, positions)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and the twin is what training differentiates through: gradients reach x
    x32 = x.float().requires_grad_()
    tool.rotary_embedding_twin(x32, cos, sin, positions).sum().backward()
    assert x32.grad is not None and x32.grad.abs().sum() > 0


def test_training_patches_the_rotation_only_while_training(tool):
    original = reference.model.rotary_embedding
    with tool.differentiable_rotary():
        assert reference.model.rotary_embedding is tool.rotary_embedding_twin
    assert reference.model.rotary_embedding is original


def test_the_tool_refuses_to_overwrite_a_folder_it_did_not_write(tool, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write"):
        tool.check_out(tmp_path)
    tool.check_out(tmp_path / "new")  # absent: fine
    (tmp_path / "TRAINING.json").write_text("{}")
    tool.check_out(tmp_path)  # its own earlier output: fine


def test_the_preset_resolves_to_the_shipped_checkpoint():
    folder = resolve_checkpoint("tiny-trained")
    assert folder == SHIPPED.resolve()
    assert CohereConfig.from_json_file(folder / "config.json") == PRESETS["tiny-trained"].config
    assert PRESETS["tiny-trained"].hub_id is None
    training = json.loads((folder / "TRAINING.json").read_text())
    assert training["steps"] > 0 and training["heldout_perplexity_fp32"] > 1
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20


def test_the_shipped_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["reference"]
    for path in SHIPPED.iterdir():
        assert any(fnmatch.fnmatch(f"tiny_trained/{path.name}", p) for p in patterns), path.name


def test_tokens_and_chat_templates_are_tinys(tokenizer):
    tiny = Tokenizer.from_file(str(REPO / "reference" / "tiny" / "tokenizer.json"))
    specials = [t.content for t in tiny.get_added_tokens_decoder().values()]
    assert [tokenizer.token_to_id(t) for t in specials] == [tiny.token_to_id(t) for t in specials]
    assert tokenizer.get_vocab_size() == PRESETS["tiny-trained"].config.vocab_size
    ours = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    theirs = json.loads((REPO / "reference" / "tiny" / "tokenizer_config.json").read_text())
    assert ours == theirs


def test_heldout_perplexity_is_far_below_the_vocabulary(model, tokenizer):
    ids = torch.tensor(tokenizer.encode(pydoc_text("heldout")).ids[:513])
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    perplexity = math.exp(F.cross_entropy(logits, ids[1:]).item())
    # A model that learned nothing scores about the vocabulary size (3072); the shipped one is far below.
    assert perplexity < tokenizer.get_vocab_size() / 4, perplexity


def test_greedy_text_is_not_one_token_repeated(model, tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    prompt_length = len(ids)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[prompt_length:]
    assert len(set(new)) >= 6, tokenizer.decode(new)


def test_the_corpus_split_is_deterministic_and_disjoint(monkeypatch):
    from pydoc_data import topics

    train, heldout = pydoc_topics("train"), pydoc_topics("heldout")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(text.strip() for text in topics.topics.values())
    fraction = len(pydoc_text("heldout")) / (len(pydoc_text("train")) + len(pydoc_text("heldout")))
    assert 0.02 < fraction < 0.1
    before = pydoc_text("train"), pydoc_text("heldout")
    monkeypatch.setattr(topics, "topics", dict(reversed(topics.topics.items())))  # another dict order
    assert (pydoc_text("train"), pydoc_text("heldout")) == before
    with pytest.raises(ValueError, match="split 'test'"):
        pydoc_text("test")

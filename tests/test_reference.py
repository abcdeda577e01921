"""The reference model against HF transformers' CohereForCausalLM, the independent oracle."""

from __future__ import annotations

import pytest
import torch

from reference import load_model
from tests.conftest import CONFIGS, save_hf_checkpoint

transformers = pytest.importorskip("transformers")

LENGTHS = [13, 7, 1]  # a batch with several sequence lengths, right-padded


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(ours, HF) loaded from the same checkpoint that transformers saved."""
    folder = save_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    ours, config = load_model(folder, torch.float32)
    hf = transformers.CohereForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config


def padded_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def test_logits_match_transformers(pair):
    name, ours, hf, config = pair
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids)
    errors = [(got[row, :n] - expected[row, :n]).abs().max().item() for row, n in enumerate(LENGTHS)]
    print(f"\n{name}: max abs logits error vs transformers {max(errors):.3e} "
          f"(max |logit| {expected.abs().max().item():.2f})")
    assert max(errors) <= 1e-4


def test_prefill_then_decode_equals_full_forward(pair):
    _, ours, _, config = pair
    ids, _ = padded_batch(config.vocab_size, seed=2)
    seq = ids.shape[1]
    with torch.no_grad():
        full = ours(ids)
        caches = ours.new_caches(len(LENGTHS), 64)
        split = 5
        logits, caches = ours(ids[:, :split], torch.zeros(3, dtype=torch.int64),
                              torch.full((3,), split - 1), caches)
        assert (logits - full[:, split - 1]).abs().max() <= 1e-4
        for pos in range(split, seq):  # one token at a time, every row at the same position
            logits, caches = ours(ids[:, pos:pos + 1], torch.full((3,), pos), torch.zeros(3, dtype=torch.int64),
                                  caches)
            assert (logits - full[:, pos]).abs().max() <= 1e-4


def test_rows_at_different_positions_equal_each_row_alone(pair):
    """Ragged decode: each row's logits equal that sequence run on its own."""
    _, ours, _, config = pair
    ids, _ = padded_batch(config.vocab_size, seed=3)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        caches = ours.new_caches(3, 64)
        logits, caches = ours(ids, torch.zeros(3, dtype=torch.int64), lengths - 1, caches)
        next_ids = logits.argmax(-1, keepdim=True)
        step, _ = ours(next_ids, lengths, torch.zeros(3, dtype=torch.int64), caches)
        for row, n in enumerate(LENGTHS):
            alone = ours(torch.cat([ids[row:row + 1, :n], next_ids[row:row + 1]], dim=1))[0, -1]
            assert (step[row] - alone).abs().max() <= 1e-4


def test_greedy_32_tokens_equal_transformers_generate(pair):
    _, ours, hf, config = pair
    prompt = torch.tensor([[5, 17, 42, 99, 3, 150, 8]])
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()
        caches = ours.new_caches(1, 64)
        logits, caches = ours(prompt, torch.zeros(1, dtype=torch.int64), torch.tensor([prompt.shape[1] - 1]),
                              caches)
        got, pos = [], prompt.shape[1]
        for _ in range(32):
            token = logits.argmax(-1)
            got.append(int(token))
            logits, caches = ours(token[:, None], torch.tensor([pos]), torch.zeros(1, dtype=torch.int64), caches)
            pos += 1
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_stays_close_to_fp32(tmp_path, dtype):
    folder = save_hf_checkpoint(tmp_path, **CONFIGS["gqa-qknorm"])
    ref, config = load_model(folder, torch.float32)
    half, _ = load_model(folder, dtype)
    assert half.dtype == dtype and all(p.dtype == dtype for p in half.parameters())
    ids, _ = padded_batch(config.vocab_size)
    with torch.no_grad():
        err = (half(ids) - ref(ids)).abs().max().item()
        scale = ref(ids).abs().max().item()
    assert err <= 0.05 * scale


def test_tiny_preset_is_deterministic_and_small():
    a, config = load_model("tiny")
    b, _ = load_model("tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    n_bytes = sum(p.numel() * 4 for p in a.parameters())
    assert n_bytes < 8e6 and config.use_qk_norm and config.num_key_value_heads < config.num_attention_heads

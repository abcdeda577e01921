"""Streaming detokenization: token-by-token pieces add up to the full decode and never split a character."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from serve.detokenize import StreamingDetokenizer

TINY = Path(__file__).resolve().parents[1] / "reference" / "tiny"

TEXTS = [
    "Hello, how are you?",
    "  two leading spaces, and   inner   runs\n\n  and a new line",
    " 안녕하세요, 만나서 반갑습니다.",
    "こんにちは。日本語を勉強しています。東京",
    "Emoji 😀🎉 👍🏽 🐧 family 👨‍👩‍👧 flag 🇰🇷",
    "Ça va? naïve café, Straße 2024-11-25 3.14159",
    "mixed: 한국어 and 日本語 and 😀 in one line ✨",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY / "tokenizer.json"))


def stream(detokenizer: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream(StreamingDetokenizer(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_characters_are_split_over_tokens(tokenizer):
    # The test above is only meaningful if some characters really are spread over several byte-level tokens.
    for text in ("😀", "👨‍👩‍👧", "갑"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert len(ids) > 1
        assert "\ufffd" in tokenizer.decode(ids[:1])


def test_held_back_until_character_completes(tokenizer):
    ids = tokenizer.encode("🐧", add_special_tokens=False).ids
    detokenizer = StreamingDetokenizer(tokenizer)
    assert [detokenizer.push(token_id) for token_id in ids] == [""] * (len(ids) - 1) + ["🐧"]
    assert detokenizer.flush() == ""


def test_prompt_context_and_special_tokens(tokenizer):
    prompt = tokenizer.encode("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi 안녕<|END_OF_TURN_TOKEN|>"
                              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>").ids
    answer = " Hello 😀 반갑습니다"
    generated = (tokenizer.encode(answer, add_special_tokens=False).ids
                 + [tokenizer.token_to_id("<|END_OF_TURN_TOKEN|>")])
    pieces = stream(StreamingDetokenizer(tokenizer, prompt_ids=prompt), generated)
    # The leading space survives and the end-of-turn token is skipped.
    assert "".join(pieces) == tokenizer.decode(generated, skip_special_tokens=True) == answer
    assert pieces[0].startswith(" ")
    assert not any("\ufffd" in piece for piece in pieces)


def test_flush_releases_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("x😀", add_special_tokens=False).ids
    detokenizer = StreamingDetokenizer(tokenizer)
    out = "".join(detokenizer.push(token_id) for token_id in ids[:-1])
    assert out == "x"
    # Generation stopped inside the emoji: what is left comes out as the tokenizer decodes it.
    assert detokenizer.flush() == tokenizer.decode(ids[:-1])[1:]

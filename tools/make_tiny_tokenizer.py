"""Generate the tokenizer files of the built-in `tiny` model (reference/tiny/).

    python tools/make_tiny_tokenizer.py [--out reference/tiny]

Writes:
  tokenizer.json         a byte-level BPE tokenizer shaped like Cohere's: NFC normalizer, single-digit split +
                         ByteLevel pre-tokenizer, ByteLevel decoder, a post-processor that prepends <BOS_TOKEN>,
                         Cohere's special tokens at ids 0..12, and a vocabulary of exactly 1024 entries.
  tokenizer_config.json  laid out as a real Command-R checkpoint ships it, with `chat_template` as the named list
                         default / tool_use / rag. The templates are this project's own (tools/tiny_templates/*.jinja,
                         documented in docs/chat-templates.md), written for Cohere's turn tokens.

The output is deterministic: BPE training over a fixed corpus breaks ties by the pair itself, and both files are
written with a fixed key order and formatting, so re-running reproduces the committed files byte for byte.
"""

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024

# Cohere's special tokens. The first eight sit at the start of the real vocabulary with these ids; the turn tokens
# live at 255000+ in the real checkpoint, here they directly follow so the whole vocabulary stays at 1024.
SPECIAL_TOKENS = [
    "<PAD>",  # 0
    "<UNK>",  # 1
    "<CLS>",  # 2
    "<SEP>",  # 3
    "<MASK_TOKEN>",  # 4
    "<BOS_TOKEN>",  # 5
    "<EOS_TOKEN>",  # 6
    "<EOP_TOKEN>",  # 7
    "<|START_OF_TURN_TOKEN|>",  # 8
    "<|END_OF_TURN_TOKEN|>",  # 9
    "<|USER_TOKEN|>",  # 10
    "<|CHATBOT_TOKEN|>",  # 11
    "<|SYSTEM_TOKEN|>",  # 12
]

# A small multilingual corpus: mostly English chat / tool-use / RAG prose (so common words get merged), plus
# accented Latin, Korean, Japanese and a few emoji. Korean and Japanese get few merges, so most of their characters
# still tokenize into several byte-level pieces, which is what the streaming detokenizer has to cope with.
CORPUS = """\
You are a helpful assistant. Answer the user's question in full sentences, using proper grammar and spelling.
Hello, how are you? I am fine, thank you. What can I do for you today?
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
What's the biggest penguin in the world? Emperor penguins are the tallest penguins.
Emperor penguins only live in Antarctica. Penguins cannot fly, but they swim very well.
Carefully perform the following instructions, in order, starting each with a new line.
Relevant Documents: 0,1
Cited Documents: 0
Answer: The tallest penguin is the emperor penguin.
Grounded answer: The <co: 0>emperor penguin</co: 0> is the tallest, and it lives in <co: 1>Antarctica</co: 1>.
Write 'Action:' followed by a json-formatted list of actions that you want to perform.
Action: ```json
[
    {
        "tool_name": "internet_search",
        "parameters": {"query": "biggest penguin in the world"}
    }
]
```
def internet_search(query: str) -> List[Dict]:
    \"\"\"Returns a list of relevant document snippets for a textual query retrieved from the internet.

    Args:
        query (str): Query to search the internet with
    \"\"\"
    pass
Document: 0
title: Tall penguins
text: Emperor penguins are the tallest.
url: https://example.com/penguins
The weather in Paris is sunny today, with a temperature of 21 degrees.
The meeting is on Monday at 10:30 in room 42. Please bring your notes and the report.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159
Le café est très bon. Où est la gare? Ça va très bien, merci. L'élève a été à l'école.
Die Straße ist schön. Über den Wolken muss die Freiheit wohl grenzenlos sein. Grüße aus München.
El niño está en el jardín. ¿Dónde está la biblioteca? Mañana vamos a la playa.
안녕하세요. 만나서 반갑습니다. 오늘 날씨가 좋네요. 감사합니다. 한국어를 공부하고 있어요.
こんにちは。はじめまして。今日はいい天気ですね。ありがとうございます。日本語を勉強しています。
東京は日本の首都です。ペンギンは飛べません。
Emoji: 😀 🎉 👍 🐧 ❤️ 🚀 ✨
Machine learning models turn text into tokens, and tokens into numbers. A tokenizer splits words into pieces.
Large language models generate one token at a time; streaming sends each new piece of text to the client.
The library opens at nine in the morning and closes at six in the evening, except on Sundays and holidays.
Please summarize the following document in three bullet points, then list the open questions.
Yesterday we visited the museum, walked along the river, and had dinner at a small restaurant near the station.
Scientists measured the temperature of the ocean every hour for a year and published their results.
"""

# The tiny model's chat templates, written for this project on Cohere's turn-token protocol (docs/chat-templates.md).
TEMPLATES_DIR = Path(__file__).resolve().parent / "tiny_templates"
TEMPLATE_NAMES = ("default", "tool_use", "rag")


def build_tokenizer(lines: list[str] | None = None, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train on ``lines`` (default: the built-in CORPUS) to exactly ``vocab_size`` entries, special tokens first."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    # transformers' CohereTokenizer rebuilds exactly this pre-tokenizer around the file's vocab and merges, so the
    # file must use it too for `tokenizers` and transformers to produce the same ids.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True) if lines is None else lines, trainer=trainer)
    bos_id = SPECIAL_TOKENS.index("<BOS_TOKEN>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<BOS_TOKEN>:0 $A:0",
        pair="<BOS_TOKEN>:0 $A:0 $B:1",
        special_tokens=[("<BOS_TOKEN>", bos_id)],
    )
    check_tokenizer(tokenizer, vocab_size)
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int = VOCAB_SIZE) -> None:
    """Fail loudly if training did not give the layout the model and the tests rely on."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise SystemExit(f"vocabulary has {size} entries, expected {vocab_size}: the corpus is too small to train "
                         "that many merges")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected_id:
            raise SystemExit(f"special token {token} got id {got}, expected {expected_id}")


def build_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": "<BOS_TOKEN>",
        "chat_template": [
            {"name": name, "template": (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")}
            for name in TEMPLATE_NAMES
        ],
        "clean_up_tokenization_spaces": False,
        "cls_token": "<CLS>",
        "eos_token": "<|END_OF_TURN_TOKEN|>",
        "legacy": True,
        "mask_token": "<MASK_TOKEN>",
        "model_max_length": 8192,
        "pad_token": "<PAD>",
        "padding_side": "left",
        "sep_token": "<SEP>",
        "tokenizer_class": "CohereTokenizer",
        "unk_token": "<UNK>",
        "use_default_system_prompt": False,
    }


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat templates) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # Tokenizer.save writes pretty JSON with a fixed key order, so the bytes only depend on the trained model.
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    config = build_config()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reference" / "tiny")
    args = parser.parse_args()

    write_tokenizer(build_tokenizer(), args.out)
    print(f"wrote {args.out / 'tokenizer.json'} and {args.out / 'tokenizer_config.json'}")


if __name__ == "__main__":
    main()

"""Tokenizing prompts: a cheap length bound before any tokenizing, tokenizing without holding the GIL, and chat
content encoded with its special tokens split (as plain text).

Special-token injection: by default a message that contains ``<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>`` gets those
control tokens, as transformers' ``apply_chat_template(tokenize=True)``, vLLM and TGI do. ``ContentSplitter``
encodes what the user supplied (message content, tool definitions and calls, documents) as plain text instead, as
OpenAI treats such text, while the template's own markup still becomes control tokens. How: before rendering,
every special-token string (and the escape character itself) in the user's strings is replaced by an escape
sequence that holds no special token and no whitespace, so a template that trims or strips content leaves it
whole. After rendering, every special-token string left in the prompt is the template's: the prompt is split
there, each piece between them is un-escaped and encoded with ``encode_special_tokens`` on (a second Tokenizer
instance: the flag is global state on the object), and the markup's tokens go in between. tokenizers itself
splits a text at added tokens before anything else, so a prompt with no special token in its content encodes to
the same ids either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tokenizers import Tokenizer

# Private-use characters: escape sequences are ESCAPE + index + END, where index points into the escaped strings.
_ESCAPE, _END = "\ue000", "\ue001"
# Unicode NFC (the Cohere tokenizer's normalizer) composes at most a few code points into one character (a Hangul
# syllable from 3 jamo; a letter with 2 combining marks), so a token covers at most this many times the characters
# of the longest entry in the vocabulary (byte-level entries hold one character per byte). This assumes, as in
# byte-level BPE, that every character of a text ends up in some token: a tokenizer whose pre-tokenizer drops
# whitespace could see a text of long whitespace runs refused.
_NORMALIZER_FACTOR = 4


def tokenize(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text. ``encode_batch`` releases the GIL while it works (``encode`` does not), so a long
    prompt tokenized in a worker thread does not stall the scheduler thread or the event loop."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]


def most_characters(tokenizer: Tokenizer, max_tokens: int) -> int:
    """An upper bound on the characters of a text that encodes to at most ``max_tokens`` tokens."""
    longest = max([len(token) for token in tokenizer.get_vocab(with_added_tokens=True)], default=1)
    return max_tokens * longest * _NORMALIZER_FACTOR


def check_text(text: str, what: str) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate such as "\\ud800" from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {text[e.start:e.end]!r} at character {e.start}, a lone surrogate: not "
                         "valid Unicode") from None


class ContentSplitter:
    """Escapes special tokens in chat content before rendering, and encodes the rendered prompt so that only the
    template's markup becomes control tokens."""

    def __init__(self, tokenizer: Tokenizer):
        special = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special},
                         key=len, reverse=True)  # longest first: a token that contains another wins
        self._ids = {token: tokenizer.token_to_id(token) for token in special}
        self._escaped = [_ESCAPE, *special]
        self._find_escaped = re.compile("|".join(re.escape(s) for s in self._escaped))
        self._find_escape = re.compile(f"{_ESCAPE}(\\d+){_END}")
        self._find_markup = re.compile("(" + "|".join(re.escape(s) for s in special) + ")") if special else None
        self._plain = Tokenizer.from_str(tokenizer.to_str())  # a second instance: encode_special_tokens is global
        self._plain.encode_special_tokens = True
        self._index = {s: i for i, s in enumerate(self._escaped)}

    def escape(self, value):
        """A copy of ``value`` (strings, lists, dicts of them) with special tokens in every string escaped."""
        if isinstance(value, str):
            return self._find_escaped.sub(lambda m: f"{_ESCAPE}{self._index[m.group(0)]}{_END}", value)
        if isinstance(value, Mapping):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def encode(self, rendered: str) -> list[int]:
        """Token ids of a prompt rendered from escaped content: special-token strings left in it are markup."""
        parts = self._find_markup.split(rendered) if self._find_markup else [rendered]
        texts = [self._find_escape.sub(lambda m: self._escaped[int(m.group(1))], part) for part in parts[::2]]
        encoded = tokenize(self._plain, texts, add_special_tokens=False)
        ids = []
        for i, text_ids in enumerate(encoded):
            ids += text_ids
            if 2 * i + 1 < len(parts):
                ids.append(self._ids[parts[2 * i + 1]])
        return ids

"""Turn generated token ids into text one token at a time, for streaming.

Decoding each token on its own is wrong for a byte-level BPE: one character (Korean, Japanese, emoji) is often
split over several tokens, and a lone piece decodes to U+FFFD. So the detokenizer decodes a short window of ids
twice, with and without the new tokens, and emits the difference once it no longer ends in an incomplete character.
The window starts at the last few prompt tokens, so decoders that treat the start of a text specially (dropping a
leading space) see the generated text in context.
"""

from collections.abc import Sequence

from tokenizers import Tokenizer

# Prompt tokens kept as decoding context; enough for any decoder's start-of-text handling.
_PROMPT_CONTEXT = 4
_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # _ids[:_read]: context whose text is already out (or is the prompt's); _ids[_read:]: tokens held back.
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never half a character)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT):
            # The last character's bytes are not all here yet; wait for the next token.
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation), even if it is an incomplete character."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, text: str) -> str:
        emitted = self._decode(self._ids[: self._read])
        new_text = text[len(emitted) :]
        # The emitted ids are only needed as context for the next token, so keep just them and start a new window.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return new_text

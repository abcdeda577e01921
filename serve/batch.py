"""The per-step core, reusable by a scheduler:

* ``Sequence``: one request's state: its tokens, the tokens not yet in the KV cache (``pending``), its position,
  its sampler and random generator, and its text (streaming detokenizer plus stop-string hold-back).
* ``Batch``: the rows of one engine cache state. ``add`` puts a sequence in the lowest free row and returns that
  row; ``release`` frees a row (a cancelled request); ``step`` feeds every live sequence (the last sampled token
  for decoding ones, in one engine call of width 1; prompt chunks for new ones, in calls of their own, so decoding
  rows are never padded to a prompt's width), samples for those whose pending tokens are all in, and frees the
  rows of sequences that finished. A scheduler thread owns one Batch, ``add``s requests as rows free up, and
  routes each step's text deltas to its clients.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tokenizers import Tokenizer

from engines import Engine

from .detokenize import StreamingDetokenizer
from .parsing import GroundedAnswer, ToolCalls
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, sample_token


@dataclasses.dataclass
class GenerationResult:
    text: str  # special tokens skipped, cut before a stop string
    token_ids: list[int]  # every generated token, the stop token or the tokens of a stop string included
    finish_reason: str  # "stop": a stop token or stop string; "length": max_new_tokens or max_context reached
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache instead of a prefill
    time_to_first_token_s: float  # from the request's start (tokenization included) to its first token
    decode_tokens_per_s: float | None  # tokens after the first, per second; None with fewer than two tokens
    tool_calls: ToolCalls | None = None  # chat() with tools
    grounded_answer: GroundedAnswer | None = None  # chat() with documents

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sequence:
    """One request in the decode loop.

    ``pending`` holds the tokens still to be written into the KV cache at ``position`` (the prompt at first, then
    the last sampled token); a live sequence always has at least one. ``take_text()`` hands out the text that is
    safe to stream: never half a character, never the start of what may become a stop string.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_token_ids: frozenset[int],
                 tokenizer: Tokenizer, max_context: int, vocab_size: int, started: float | None = None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.token_ids: list[int] = []
        self.pending = list(prompt_ids)
        self.position = 0
        self.cached_tokens = 0  # prompt tokens loaded from the prefix cache
        # The prompt plus generation must fit the static cache: that, not max_new_tokens, may end it first.
        self.max_new_tokens = min(params.max_new_tokens, max_context - len(prompt_ids))
        self.finish_reason: str | None = None
        # As vLLM, any int64 seed: a negative one is taken modulo 2**64 (two's complement), so seeds stay distinct.
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2 ** 64)
        self.seen: np.ndarray | None = None
        if params.repetition_penalty != 1:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[self.prompt_ids] = True
        self._detokenizer = StreamingDetokenizer(tokenizer, self.prompt_ids)
        self._text = ""  # decoded so far, possibly ending in the start of a stop string
        self._released = 0  # characters of _text already handed out by take_text()
        self.started = time.perf_counter() if started is None else started
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def consumed(self, count: int) -> None:
        """``count`` pending tokens were written into the cache."""
        self.position += count
        del self.pending[:count]

    def accept_logits(self, logits: np.ndarray) -> None:
        """Sample the next token from this sequence's logits ``[vocab]`` and decide whether it ends here."""
        token = sample_token(logits, self.params, self.rng, self.seen)
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.token_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if token in self.stop_token_ids:  # its text (usually none: a special token) is not part of the reply
            self._finish("stop")
            return
        self._add_text(self._detokenizer.push(token))
        if self.finished:  # a stop string
            return
        if len(self.token_ids) >= self.max_new_tokens:
            self._finish("length")
        else:
            self.pending.append(token)

    def take_text(self) -> str:
        """The text that became safe to stream since the last call."""
        end = len(self._text)
        if not self.finished:
            end -= self._stop_prefix_length()
        piece = self._text[self._released:end]
        self._released = max(self._released, end)
        return piece

    def result(self) -> GenerationResult:
        if not self.finished:
            raise RuntimeError("the sequence has not finished; step its Batch until it has")
        decode_s = (self.last_token_at or 0) - (self.first_token_at or 0)
        rate = (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else None
        return GenerationResult(text=self._text, token_ids=list(self.token_ids), finish_reason=self.finish_reason,
                                prompt_tokens=len(self.prompt_ids), cached_tokens=self.cached_tokens,
                                time_to_first_token_s=(self.first_token_at or self.started) - self.started,
                                decode_tokens_per_s=rate)

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self._text) - max((len(s) for s in self.params.stop), default=0))
        self._text += piece
        # The earliest stop string that the new piece completes (it may have begun in earlier pieces).
        hits = [i for i in (self._text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self._text = self._text[:min(hits)]
            self.finish_reason = "stop"

    def _finish(self, reason: str) -> None:
        # Whatever the detokenizer still holds (an incomplete character) is the end of the text.
        self._add_text(self._detokenizer.flush())
        self.finish_reason = self.finish_reason or reason

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that is the start of a stop string (held back from streaming)."""
        longest = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Batch:
    """The rows of one engine cache state, each holding at most one live Sequence.

    A ``step`` feeds every live sequence's next tokens, chunked prefill as vLLM schedules it: decoding rows are
    never padded to a prompt's width.

    * Rows whose pending run is one token (decoding, or a prompt's last token) share one engine call of width 1
      over rows ``[0, last such row]``, so a lone request costs one row, not the whole batch (new sequences take
      the lowest free row).
    * Rows still prefilling (more than one pending token) run in calls of their own with ``first_row``; adjacent
      ones share a call. ``max_step_tokens`` (vLLM's ``max_num_batched_tokens``, for a scheduler) is the prompt
      tokens all of a step's prefills may write, handed out first come first served (``Sequence.started``): a long
      prompt is prefilled over several steps and stalls the decoding rows for one budget's worth of compute at a
      time. Without it (offline generation) each prefill writes its whole pending run in one step.

    Inside the width-1 call, a free row writes a pad token at slot 0 (its cache is dead, and a new sequence's
    prefill overwrites it from slot 0) and a prefilling row one at its own ``position``, without advancing it: the
    slot lies beyond its real tokens, and its next chunk, written from ``position``, overwrites it. Tokens
    right-padded past a row's real ones in a prefill call likewise land in slots that attention masks until real
    tokens overwrite them, so each row computes exactly what it would alone.

    With a ``prefix_cache``, ``add`` copies the longest cached prefix of the prompt into the row (the sequence then
    prefills only the rest), and a step that completes a prompt's prefill stores its full blocks.
    """

    def __init__(self, engine: Engine, rows: int, pad_token_id: int, max_step_tokens: int | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.state = engine.allocate(rows)
        self.rows: list[Sequence | None] = [None] * rows
        self.pad_token_id = pad_token_id
        self.max_step_tokens = max_step_tokens

    @property
    def live(self) -> list[Sequence]:
        return [seq for seq in self.rows if seq is not None]

    @property
    def free_rows(self) -> int:
        return self.rows.count(None)

    def add(self, seq: Sequence) -> int:
        """Put ``seq`` in the lowest free row; returns that row."""
        if None not in self.rows:
            raise RuntimeError(f"all {len(self.rows)} rows of the batch are taken")
        if seq.position != 0:
            raise ValueError("a sequence enters a batch before its prompt is in any cache")
        row = self.rows.index(None)
        if self.prefix_cache is not None:
            seq.cached_tokens = self.prefix_cache.load(self.engine, self.state, row, seq.prompt_ids)
            seq.consumed(seq.cached_tokens)
        self.rows[row] = seq
        return row

    def release(self, row: int) -> None:
        """Free a row whose sequence will not be stepped again (cancelled, or failed with the engine). Its cache is
        dead: the next sequence's prefill overwrites it from slot 0."""
        self.rows[row] = None

    def step(self) -> list[Sequence]:
        """A width-1 engine call for the decoding rows and one per run of adjacent prefilling rows; returns the
        sequences that sampled a token (finished ones have left their row)."""
        chunks = self._prefill_chunks()
        decoding = {row: 1 for row, seq in enumerate(self.rows) if seq is not None and len(seq.pending) == 1}
        logits: dict[int, np.ndarray] = {}
        # The width-1 call first: it pads the prefilling rows below its last row at their position, before their
        # chunks are written from there.
        if decoding:
            logits.update(self._call(range(max(decoding) + 1), 1, decoding))
        for rows in self._prefill_calls(chunks):
            logits.update(self._call(rows, max(chunks[row] for row in rows), chunks))
        sampled = []
        for row, count in sorted({**chunks, **decoding}.items()):
            seq = self.rows[row]
            seq.consumed(count)
            if seq.pending:  # a prompt longer than this step's chunk: no next token yet
                continue
            if self.prefix_cache is not None and not seq.token_ids:  # its prompt is all in the cache now
                self.prefix_cache.store(self.engine, self.state, row, seq.prompt_ids)
            seq.accept_logits(logits[row])
            sampled.append(seq)
            if seq.finished:
                self.rows[row] = None
        return sampled

    def _prefill_chunks(self) -> dict[int, int]:
        """Row -> how many pending tokens each prefilling row writes this step: the oldest requests first, within
        ``max_step_tokens`` for them all; a row the budget does not reach waits for a later step. (A prompt is
        shorter than ``max_context`` and a sequence stops generating there, so a pending run always fits.)"""
        budget = self.max_step_tokens
        chunks = {}
        prefilling = sorted((seq.started, row) for row, seq in enumerate(self.rows)
                            if seq is not None and len(seq.pending) > 1)
        for _, row in prefilling:
            chunk = len(self.rows[row].pending)
            if budget is not None:
                chunk = min(chunk, budget)
                budget -= chunk
            if chunk:
                chunks[row] = chunk
        return chunks

    def _prefill_calls(self, chunks: dict[int, int]) -> list[range]:
        """The rows of ``chunks`` as runs of adjacent rows, one engine call each. Adjacent rows share a call, padded
        to its widest chunk, while every row's padding stays inside ``max_context`` and, with ``max_step_tokens``,
        the call's padded tokens stay inside that budget (a 255-token chunk does not pad a 1-token one to 255)."""
        max_context = self.engine.spec.max_context
        calls: list[range] = []
        for row in sorted(chunks):
            if calls and calls[-1].stop == row:
                merged = range(calls[-1].start, row + 1)
                width = max(chunks[r] for r in merged)
                fits = all(self.rows[r].position + width <= max_context for r in merged)
                if fits and (self.max_step_tokens is None or len(merged) * width <= self.max_step_tokens):
                    calls[-1] = merged
                    continue
            calls.append(range(row, row + 1))
        return calls

    def _call(self, rows: range, width: int, counts: dict[int, int]) -> dict[int, np.ndarray]:
        """One engine call over the adjacent ``rows``, ``width`` tokens each: a row in ``counts`` writes that many of
        its pending tokens at its position; any other live row a pad token at its position (not advanced), a free
        row one at slot 0. Returns the logits of the rows in ``counts``, at their last written token."""
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        write_indices = np.zeros(len(rows), dtype=np.int64)
        logits_indices = np.zeros(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            seq = self.rows[row]
            if seq is None:
                continue
            write_indices[i] = seq.position
            if row in counts:
                input_ids[i, :counts[row]] = seq.pending[:counts[row]]
                logits_indices[i] = counts[row] - 1
        logits = self.engine.step(self.state, input_ids, write_indices, logits_indices, rows.start)
        return {row: logits[i] for i, row in enumerate(rows) if row in counts}

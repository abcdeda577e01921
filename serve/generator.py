"""Text generation on an artifact: tokenize, run the engine step by step, sample, detokenize, stop.

    gen = Generator("build/tiny-float32")
    gen.generate("Hello", max_new_tokens=20).text
    for piece in (s := gen.stream("Hello", temperature=0.7, seed=1)):
        print(piece, end="")
    s.result.finish_reason

The per-step core is reusable by a scheduler (continuous batching is a later issue):

* ``Sequence``: one request's state: its tokens, the tokens not yet in the KV cache (``pending``), its position,
  its sampler and random generator, and its text (streaming detokenizer plus stop-string hold-back).
* ``Batch``: the rows ("slots") of one engine cache state. ``add`` puts a sequence in a free slot; ``step`` runs
  one engine call over every live sequence (prompt tokens for new ones, the last sampled token for the others),
  samples for those whose pending tokens are all in, and frees the slots of sequences that finished. A scheduler
  thread can own one Batch, ``add`` requests as slots free up, and route each step's text deltas to its clients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engines import Artifact, ArtifactError, Engine, open_engine

from .chat import ChatTemplates
from .detokenize import StreamingDetokenizer
from .parsing import GroundedAnswer, ToolCalls, parse_grounded_answer, parse_tool_calls

log = logging.getLogger(__name__)

END_OF_TURN = "<|END_OF_TURN_TOKEN|>"
# transformers' default is max_length=20 tokens in all, prompt included, which it warns about itself; a server
# needs a length that fits a reply, so a checkpoint without max_new_tokens gets this.
DEFAULT_MAX_NEW_TOKENS = 256
# transformers' TopKLogitsWarper default, used when a checkpoint asks for sampling without naming top_k.
TRANSFORMERS_DEFAULT_TOP_K = 50


# ------------------------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. ``temperature=0`` is greedy (as in OpenAI's API);
    ``top_k=0``, ``top_p=1``, ``min_p=0`` and ``repetition_penalty=1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None  # None: fresh entropy per request
    stop: tuple[str, ...] = ()  # stop strings, as OpenAI's `stop`: not included in the text
    stop_token_ids: tuple[int, ...] = ()  # besides the checkpoint's end-of-turn and eos tokens

    def __post_init__(self):
        # OpenAI accepts a single string for `stop`; lists become tuples so the params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first parameter that is out of range."""
        _number("temperature", self.temperature)
        _number("top_p", self.top_p)
        _number("min_p", self.min_p)
        _number("repetition_penalty", self.repetition_penalty)
        _integer("top_k", self.top_k)
        _integer("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ValueError(f"temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p}: must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k}: must be >= 0 (0 switches it off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p {self.min_p}: must lie in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty {self.repetition_penalty}: must be > 0 (1 switches it off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens}: must be >= 1")
        if self.seed is not None:
            _integer("seed", self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop {list(self.stop)!r}: must be non-empty strings")
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise ValueError(f"stop_token_ids: {token_id} is not a token id of this model "
                                 f"(vocabulary of {vocab_size})")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} {value!r}: must be a number")


def _integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} {value!r}: must be an integer")


def token_probabilities(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None) -> np.ndarray:
    """The distribution the next token is drawn from (float64, sums to 1), in transformers' order: repetition
    penalty, temperature, top-k, top-p, min-p. ``seen``: boolean mask over the vocabulary of the tokens already in
    prompt + output. Greedy params give a one-hot distribution on the argmax."""
    scores = penalized(logits, params.repetition_penalty, seen)
    if params.greedy:
        probs = np.zeros_like(scores)
        probs[np.argmax(scores)] = 1.0
        return probs
    scores /= params.temperature
    if 0 < params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score stay, as in transformers
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1:
        # The smallest set of most likely tokens whose probability reaches top_p (always at least one token).
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs  # probability mass of the tokens ranked above
        probs[order[before >= params.top_p]] = 0.0
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def penalized(logits: np.ndarray, penalty: float, seen: np.ndarray | None) -> np.ndarray:
    """A float64 copy of ``logits`` with transformers' repetition penalty on the ``seen`` tokens: positive
    logits divided by ``penalty``, negative ones multiplied, so a penalty > 1 always makes them less likely."""
    scores = logits.astype(np.float64)
    if penalty != 1 and seen is not None and seen.any():
        chosen = scores[seen]
        scores[seen] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return scores


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 seen: np.ndarray | None = None) -> int:
    """Pick the next token from one row of logits ``[vocab]``."""
    if params.greedy:  # no random draw: greedy output never depends on the seed
        return int(np.argmax(penalized(logits, params.repetition_penalty, seen)))
    probs = token_probabilities(logits, params, seen)
    # Inverse-CDF draw; side="right" never lands on a zero-probability token, min() guards float round-off.
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), probs.size - 1))


def defaults_from_generation_config(config: dict) -> SamplingParams:
    """Sampling defaults as transformers reads generation_config.json: greedy unless ``do_sample`` is true;
    when sampling, an unnamed temperature / top_k / top_p takes transformers' default (1.0 / 50 / 1.0)."""
    def get(name, default):
        value = config.get(name)
        return default if value is None else value

    params = {"repetition_penalty": get("repetition_penalty", 1.0),
              "max_new_tokens": get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)}
    if get("do_sample", False):
        params.update(temperature=get("temperature", 1.0), top_k=get("top_k", TRANSFORMERS_DEFAULT_TOP_K),
                      top_p=get("top_p", 1.0), min_p=get("min_p", 0.0))
    return SamplingParams(**params)


# --------------------------------------------------------------------------------------------------- the core


@dataclasses.dataclass
class GenerationResult:
    text: str  # special tokens skipped, cut before a stop string
    token_ids: list[int]  # every generated token, the stop token or the tokens of a stop string included
    finish_reason: str  # "stop": a stop token or stop string; "length": max_new_tokens or max_context reached
    prompt_tokens: int
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
        # The prompt plus generation must fit the static cache: that, not max_new_tokens, may end it first.
        self.max_new_tokens = min(params.max_new_tokens, max_context - len(prompt_ids))
        self.finish_reason: str | None = None
        self.rng = np.random.default_rng(params.seed)
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
                                prompt_tokens=len(self.prompt_ids),
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
    """The rows of one engine cache state, each a slot for at most one live Sequence.

    Every ``step`` is one engine call over all rows. A live sequence writes up to ``width`` of its pending tokens at
    its own position; the width is the longest pending run, capped so that every live row stays inside
    ``max_context`` (and by ``max_step_tokens``, for a scheduler that wants to chunk long prompts so running
    sequences keep streaming). A prompt longer than the width is prefilled over several steps. A step runs only the
    rows up to the last live one (new sequences take the lowest free row), so a lone request costs one row, not
    the whole batch. Free rows below it write a pad token at slot 0: their cache is dead, and a new sequence's
    prefill overwrites it from slot 0. Tokens right-padded
    past a row's real ones land in slots after its position, which attention masks until real tokens overwrite
    them, so each row computes exactly what it would alone.
    """

    def __init__(self, engine: Engine, rows: int, pad_token_id: int, max_step_tokens: int | None = None):
        self.engine = engine
        self.state = engine.allocate(rows)
        self.slots: list[Sequence | None] = [None] * rows
        self.pad_token_id = pad_token_id
        self.max_step_tokens = max_step_tokens

    @property
    def live(self) -> list[Sequence]:
        return [seq for seq in self.slots if seq is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def add(self, seq: Sequence) -> None:
        if None not in self.slots:
            raise RuntimeError(f"all {len(self.slots)} rows of the batch are taken")
        if seq.position != 0:
            raise ValueError("a sequence enters a batch before its prompt is in any cache")
        self.slots[self.slots.index(None)] = seq

    def step(self) -> list[Sequence]:
        """One engine call; returns the sequences that sampled a token (finished ones have left their slot)."""
        live = self.live
        if not live:
            return []
        max_context = self.engine.spec.max_context
        width = min(max(len(seq.pending) for seq in live), min(max_context - seq.position for seq in live),
                    self.max_step_tokens or max_context)
        rows = max(row for row, seq in enumerate(self.slots) if seq is not None) + 1
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)
        write_indices = np.zeros(rows, dtype=np.int64)
        logits_indices = np.zeros(rows, dtype=np.int64)
        fed = [0] * rows
        for row, seq in enumerate(self.slots[:rows]):
            if seq is None:
                continue
            chunk = seq.pending[:width]
            fed[row] = len(chunk)
            input_ids[row, :len(chunk)] = chunk
            write_indices[row] = seq.position
            logits_indices[row] = len(chunk) - 1
        logits = self.engine.step(self.state, input_ids, write_indices, logits_indices)
        sampled = []
        for row, seq in enumerate(self.slots[:rows]):
            if seq is None:
                continue
            seq.consumed(fed[row])
            if seq.pending:  # a prompt longer than this step's width: no next token yet
                continue
            seq.accept_logits(logits[row])
            sampled.append(seq)
            if seq.finished:
                self.slots[row] = None
        return sampled


# ------------------------------------------------------------------------------------------------- generator


class Stream:
    """Iterate for the text pieces of one request as they are decoded; ``result`` once the iteration is over."""

    def __init__(self, pieces: Iterator[str], seq: Sequence):
        self._pieces = pieces
        self._seq = seq

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def result(self) -> GenerationResult:
        if not self._seq.finished:
            raise RuntimeError("the stream has not been read to its end")
        return self._seq.result()


Prompt = str | list[int]


class Generator:
    """Generation on one artifact folder. Each call allocates its own cache state, so calls from several threads
    may run at once (without batching them together: that is the scheduler's job, built on ``Batch``)."""

    def __init__(self, artifacts: str | Path, backend: str = "auto"):
        self.artifact = Artifact.open(artifacts)
        self.spec = self.artifact.spec
        self.engine = open_engine(self.artifact, backend)
        self.backend = self.engine.backend
        self.tokenizer = Tokenizer.from_file(str(self.artifact.path("tokenizer.json")))
        self.templates = ChatTemplates.from_tokenizer_config(self._json("tokenizer_config.json"))
        generation_config = self._json("generation_config.json")
        self.defaults = defaults_from_generation_config(generation_config)
        try:
            self.defaults.validate(self.spec.vocab_size)
        except ValueError as e:
            raise ArtifactError(f"{self.artifact.path('generation_config.json')}: {e}") from None
        self.stop_token_ids = frozenset(self._stop_token_ids(generation_config))
        model_config = self.artifact.manifest.config
        pad = generation_config.get("pad_token_id", model_config.get("pad_token_id"))
        self.pad_token_id = pad if isinstance(pad, int) and 0 <= pad < self.spec.vocab_size else 0
        log.info("loaded %s on %s (max_batch %d, max_context %d)", self.artifact.folder, self.backend,
                 self.spec.max_batch, self.spec.max_context)

    def _json(self, name: str) -> dict:
        path = self.artifact.path(name)
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from None

    def _stop_token_ids(self, generation_config: dict) -> set[int]:
        eos = generation_config.get("eos_token_id", self.artifact.manifest.config.get("eos_token_id"))
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        end_of_turn = self.tokenizer.token_to_id(END_OF_TURN)
        if end_of_turn is not None:
            ids.add(end_of_turn)
        if not ids:
            log.warning("%s names no eos token: generation stops only at max_new_tokens or a stop string",
                        self.artifact.folder)
        return ids

    # --- prompts

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = True, citation_mode: str = "accurate") -> str | list[int]:
        """The prompt transformers' ``apply_chat_template`` renders, or its token ids with ``tokenize``."""
        text = self.templates.render(messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, citation_mode=citation_mode)
        # The template already starts with BOS: adding special tokens again would double it.
        return self.tokenizer.encode(text, add_special_tokens=False).ids if tokenize else text

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string is tokenized as transformers' ``tokenizer(prompt)`` does (BOS first);
        token ids are checked against the vocabulary and the artifact's max_context."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})")
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.spec.max_context:
            raise ValueError(f"prompt has {len(ids)} tokens; the artifact's max_context is {self.spec.max_context} "
                             "tokens (prompt plus reply), which leaves no room to generate. Shorten the prompt or "
                             "export with a larger --max-context.")
        return ids

    def sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's defaults with ``overrides``, validated."""
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        params = dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        params.validate(self.spec.vocab_size)
        return params

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, started: float | None = None) -> Sequence:
        return Sequence(prompt_ids, params, self.stop_token_ids | set(params.stop_token_ids), self.tokenizer,
                        self.spec.max_context, self.spec.vocab_size, started)

    # --- generation

    def generate(self, prompt: Prompt | list[Prompt], **sampling) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (string or token ids) or a list of them. A list runs as one batch through the
        engine; a list longer than the artifact's max_batch runs in consecutive batches of max_batch. Each
        result equals what its prompt gives alone (with the same seed)."""
        started = time.perf_counter()
        single = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and all(
            isinstance(t, numbers.Integral) for t in prompt))
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompt is empty" if isinstance(prompts, (list, tuple)) else
                             f"prompt: expected a string, token ids or a list of them, got {type(prompt).__name__}")
        params = self.sampling(**sampling)
        results = self._run([self.encode(p) for p in prompts], params, started)
        return results[0] if single else results

    def _run(self, prompts: list[list[int]], params: SamplingParams, started: float) -> list[GenerationResult]:
        sequences = [self.new_sequence(ids, params, started) for ids in prompts]
        for first in range(0, len(sequences), self.spec.max_batch):
            chunk = sequences[first:first + self.spec.max_batch]
            batch = Batch(self.engine, len(chunk), self.pad_token_id)
            for seq in chunk:
                batch.add(seq)
            while batch.live:
                batch.step()
        return [seq.result() for seq in sequences]

    def stream(self, prompt: Prompt, **sampling) -> Stream:
        """Generate for one prompt, yielding text pieces as they are decoded; the returned Stream's ``result``
        holds the whole result once iterated. Bad input raises here, before anything is computed or yielded."""
        started = time.perf_counter()
        params = self.sampling(**sampling)
        seq = self.new_sequence(self.encode(prompt), params, started)

        def pieces() -> Iterator[str]:
            batch = Batch(self.engine, 1, self.pad_token_id)
            batch.add(seq)
            while batch.live:
                batch.step()
                piece = seq.take_text()
                if piece:
                    yield piece

        return Stream(pieces(), seq)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, documents: list[dict] | None = None,
             citation_mode: str = "accurate", **sampling) -> GenerationResult:
        """Render the conversation with the chat template and generate the assistant's reply. With ``tools`` the
        reply's tool calls are parsed into ``result.tool_calls``; with ``documents`` its citations into
        ``result.grounded_answer`` (both keep the raw text and an ``error`` when the model's output is malformed)."""
        started = time.perf_counter()
        params = self.sampling(**sampling)  # before rendering: bad parameters are reported first, and cheaply
        ids = self.apply_chat_template(messages, tools=tools, documents=documents, tokenize=True,
                                       citation_mode=citation_mode)
        [result] = self._run([self.encode(ids)], params, started)
        if tools is not None:
            result.tool_calls = parse_tool_calls(result.text)
        if documents is not None:
            result.grounded_answer = parse_grounded_answer(result.text)
        return result

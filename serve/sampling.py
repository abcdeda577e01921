"""Sampling: the parameters of one request and how the next token is drawn from a row of logits (pure numpy)."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers

import numpy as np

log = logging.getLogger(__name__)

# transformers' default is max_length=20 tokens in all, prompt included, which it warns about itself; a server
# needs a length that fits a reply, so a checkpoint without max_new_tokens gets this.
DEFAULT_MAX_NEW_TOKENS = 256
# transformers' TopKLogitsWarper default, used when a checkpoint asks for sampling without naming top_k.
TRANSFORMERS_DEFAULT_TOP_K = 50
# vLLM's policy for tiny temperatures: one in (0, 0.01) samples as 0.01 (with a warning). Dividing logits by 1e-320
# overflows to inf and the draw degenerates (it always picked the last token of the vocabulary).
MIN_TEMPERATURE = 0.01
# Stop strings are checked after every token, against every stop string: OpenAI allows 4 (TGI's
# --max-stop-sequences defaults to 4); the length bound keeps the hold-back and the checks small.
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256


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
    seed: int | None = None  # None: fresh entropy per request; a negative seed is used modulo 2**64
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
        if 0 < self.temperature < MIN_TEMPERATURE:
            log.warning("temperature %g is below %g: sampling with %g (as vLLM does)", self.temperature,
                        MIN_TEMPERATURE, MIN_TEMPERATURE)
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
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: {len(self.stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop {list(self.stop)!r}: must be non-empty strings")
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_LENGTH:
            raise ValueError(f"stop: a stop string of {len(longest)} characters; at most {MAX_STOP_LENGTH} are "
                             "allowed")
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise ValueError(f"stop_token_ids: {token_id} is not a token id of this model "
                                 f"(vocabulary of {vocab_size})")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {value!r}: must be a number")
    if not math.isfinite(value):  # an infinite temperature or penalty turns every score into inf or nan
        raise ValueError(f"{name} {value!r}: must be a finite number")


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
    scores /= max(params.temperature, MIN_TEMPERATURE)
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

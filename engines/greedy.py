"""The one decode loop of parity, the benchmark and the tests, on any ``Engine`` (the reference model included,
as ``export.reference_engine.ReferenceEngine``).

Both loops prefill a batch of prompts of different lengths in one step (right-padded: each row asks for the
logits of its own last token), then decode one token per row per step, every row at its own position.

* ``greedy``: each engine generates from its own argmax;
* ``teacher_forced``: several engines step in lockstep on the same inputs, every decode step fed the first
  engine's argmax, so they can be compared step by step however they rank the logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .base import Engine


def right_pad(prompts: list[list[int]], pad: int = 0) -> np.ndarray:
    """``[rows, longest]`` int64; padding sits past every row's last token, so the row never attends to it."""
    width = max(map(len, prompts))
    return np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int64)


def greedy(engine: Engine, prompts: list[list[int]], new_tokens: int,
           on_token: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
    """``new_tokens`` greedy tokens after every prompt, all rows in one batch of a freshly allocated state.

    ``on_token(tokens)`` is called as soon as each token ``[rows]`` is chosen, before the next step starts: the
    benchmark's clock.
    """
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    zeros = np.zeros(len(prompts), np.int64)
    state = engine.allocate(len(prompts))
    logits = engine.step(state, right_pad(prompts), zeros, lengths - 1)
    out: list[list[int]] = [[] for _ in prompts]
    positions = lengths
    for i in range(new_tokens):
        tokens = logits.argmax(-1)
        if on_token is not None:
            on_token(tokens)
        for row, t in zip(out, tokens):
            row.append(int(t))
        if i + 1 < new_tokens:
            logits = engine.step(state, tokens[:, None].astype(np.int64), positions, zeros)
            positions = positions + 1
    return out


@dataclasses.dataclass
class Lockstep:
    """One step of ``teacher_forced``: the inputs every engine was given, and what each gave back."""

    input_ids: np.ndarray
    write_indices: np.ndarray
    logits_indices: np.ndarray
    logits: list[np.ndarray]  # per engine, in the order they were passed
    states: list  # per engine, advanced by this step (``engine.read_cache(state)`` shows the caches)

    @property
    def filled(self) -> np.ndarray:
        """Per row, how many cache slots hold real tokens after this step."""
        return self.write_indices + self.logits_indices + 1


def teacher_forced(engines: Sequence[Engine], prompts: list[list[int]], decode_steps: int,
                   continuation: int = 0) -> Iterator[Lockstep]:
    """The prefill of ``prompts``, then ``decode_steps`` steps, every engine on the same inputs: each decode step
    is fed the first engine's greedy tokens. Yields after every step, while the states hold that step's caches.

    With ``continuation``, one last step appends several tokens to every row at its own position (row ``b`` gets
    ``max(1, continuation - b)``: right-padded), as a chunked prefill or a prompt after a cached prefix does."""
    batch = len(prompts)
    zeros = np.zeros(batch, np.int64)
    states = [engine.allocate(batch) for engine in engines]
    input_ids = right_pad(prompts)
    write_indices, logits_indices = zeros, np.array([len(p) for p in prompts], dtype=np.int64) - 1
    for i in range(1 + decode_steps + (continuation > 0)):
        logits = [engine.step(state, input_ids, write_indices, logits_indices)
                  for engine, state in zip(engines, states)]
        step = Lockstep(input_ids, write_indices, logits_indices, logits, states)
        yield step
        tokens = logits[0].argmax(-1)
        write_indices, logits_indices = step.filled, zeros
        if i < decode_steps:
            input_ids = tokens[:, None].astype(np.int64)
        else:  # the continuation: the greedy token, then tokens of the row's own prompt
            chunks = [[int(t)] + [p[j % len(p)] for j in range(max(1, continuation - b) - 1)]
                      for b, (t, p) in enumerate(zip(tokens, prompts))]
            input_ids = right_pad(chunks)
            logits_indices = np.array([len(c) for c in chunks], dtype=np.int64) - 1

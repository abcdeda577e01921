"""The one interface every runtime implements, and the graph IO spec that an artifact's manifest declares.

An engine runs the exported decoder step. It knows tensors, not tokens:

    state = engine.allocate(batch)                    # zeroed static KV caches on the engine's device
    logits = engine.step(state, input_ids, write_indices, logits_indices, first_row)   # caches advanced in place

``input_ids [rows, seq]`` int64 are the new tokens of rows ``[first_row, first_row + rows)`` of the state
(``first_row`` defaults to 0; ``first_row + rows <= batch``: a step over a half-empty batch costs what its live
rows cost, and a scheduler can prefill a few rows in a call of their own while the others decode in a call of
width 1), right-padded; ``write_indices [rows]`` the position of each row's first new token, ``logits_indices
[rows]`` which of the new tokens each row wants logits for. ``logits`` come back as a float32 numpy array
``[rows, vocab]``, in the order of the stepped rows.

The graph has one more input the engines fill themselves: ``kv_slots = arange(L)``, the cache slots attention
reads, ``L >= max(write_indices) + seq``. ONNX Runtime passes the filled prefix, so a step costs what its context
costs; TensorRT does the same for prefill and passes a bucket of slots for decode (a power of two from 256, or
``max_context``), so decode has few shapes, each replayed as a CUDA graph (decode from row 0; a step with
another ``first_row`` runs eagerly).
Rows are independent: each row's logits equal running that row alone. Every row needs
``write_indices[b] + seq <= max_context``.

Prefix caching (serve/prefix_cache.py) moves ranges of cache slots, on the engine's device, without knowing tokens:

    block = engine.save_slots(state, row, start, count)   # a copy of slots [start, start+count) of every layer
    engine.load_slots(state, row, start, block)           # written back, into any row of any state, at ``start``

A block holds ``spec.bytes_per_slot * count`` bytes of the engine's device memory.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers

import numpy as np

INPUT_IDS, WRITE_INDICES, LOGITS_INDICES, KV_SLOTS, LOGITS = ("input_ids", "write_indices", "logits_indices",
                                                               "kv_slots", "logits")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_{layer}", f"past_value_{layer}"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_key_{layer}", f"present_value_{layer}"


# Upper bounds of every GraphSpec size: far above any Cohere checkpoint (Command R+: 64 layers, 256000 tokens,
# 131072 context), far below what would exhaust memory when an engine sizes its caches or IO from them.
LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096, "vocab_size": 1 << 22, "max_batch": 4096,
          "max_context": 1 << 22}


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """What the exported graph takes and gives; written to and read from the manifest's ``graph`` section."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_batch: int
    max_context: int
    dtype: str  # "float16" | "float32": weights, activations and caches; logits are always float32

    def __post_init__(self):
        # Refused before anything is sized from them: a manifest saying num_layers=10**12 must not allocate.
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{name} {value!r}: must be an integer in [1, {most}]")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype {self.dtype!r}: must be float16 or float32")

    @property
    def cache_shape_per_row(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.max_context, self.head_dim

    @property
    def bytes_per_slot(self) -> int:
        """The keys and values of one token position in every layer."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def io(self) -> dict:
        """Names, shapes (symbolic dims as strings) and dtypes of every input and output, for the manifest."""
        cache = ["batch", self.num_kv_heads, self.max_context, self.head_dim]
        inputs = {INPUT_IDS: (["batch", "seq"], "int64"), WRITE_INDICES: (["batch"], "int64"),
                  LOGITS_INDICES: (["batch"], "int64"), KV_SLOTS: (["kv_slots"], "int64")}
        outputs = {LOGITS: (["batch", self.vocab_size], "float32")}
        for layer in range(self.num_layers):
            for name in past_names(layer):
                inputs[name] = (cache, self.dtype)
            for name in present_names(layer):
                outputs[name] = (cache, self.dtype)
        as_dict = lambda d: {k: {"shape": s, "dtype": t} for k, (s, t) in d.items()}  # noqa: E731
        return {"inputs": as_dict(inputs), "outputs": as_dict(outputs)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "GraphSpec":
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class EngineError(RuntimeError):
    """An engine cannot load or run the artifact; the message says what to do."""


class Engine(abc.ABC):
    """A runtime for one exported decoder graph, in the shape of Polygraphy's runners: ``step`` checks its inputs
    once, here, and hands them to the runtime's ``_step``; ``close`` (or leaving a ``with`` block) frees what the
    runtime holds on purpose rather than leaving it to the garbage collector.

    Every state that ``allocate`` returns has a ``batch`` attribute: the rows it holds.
    """

    spec: GraphSpec
    backend: str  # what actually runs, e.g. "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "reference"

    @abc.abstractmethod
    def allocate(self, batch: int):
        """A zeroed KV-cache state for ``batch`` rows, living on the engine's device."""

    def step(self, state, input_ids: np.ndarray, write_indices: np.ndarray, logits_indices: np.ndarray,
             first_row: int = 0) -> np.ndarray:
        """Run one forward over new tokens of rows ``[first_row, first_row + rows)``; returns float32 logits
        ``[rows, vocab]``, advances those rows of ``state`` and leaves the others untouched."""
        input_ids, write_indices, logits_indices, first_row = self._check_step(
            state.batch, input_ids, write_indices, logits_indices, first_row)
        return self._step(state, input_ids, write_indices, logits_indices, first_row)

    @abc.abstractmethod
    def _step(self, state, input_ids: np.ndarray, write_indices: np.ndarray, logits_indices: np.ndarray,
              first_row: int) -> np.ndarray:
        """``step`` after its checks: contiguous int64 arrays of consistent shapes, inside the artifact's bounds,
        and rows ``[first_row, first_row + rows)`` inside the state."""

    def save_slots(self, state, row: int, start: int, count: int):
        """A copy, on the engine's device, of cache slots ``[start, start + count)`` of ``row`` in every layer's
        key and value cache: an opaque block for ``load_slots``, holding ``spec.bytes_per_slot * count`` bytes."""
        self._check_slots(state.batch, row, start, count)
        return self._save_slots(state, row, start, count)

    def load_slots(self, state, row: int, start: int, block) -> None:
        """Write a block from ``save_slots`` (of this engine) into slots ``[start, start + its count)`` of ``row``."""
        self._check_slots(state.batch, row, start, self._block_count(block))
        self._load_slots(state, row, start, block)

    @abc.abstractmethod
    def _save_slots(self, state, row: int, start: int, count: int):
        """``save_slots`` after its checks."""

    @abc.abstractmethod
    def _load_slots(self, state, row: int, start: int, block) -> None:
        """``load_slots`` after its checks."""

    @abc.abstractmethod
    def _block_count(self, block) -> int:
        """How many slots a block from ``save_slots`` holds."""

    @abc.abstractmethod
    def read_cache(self, state) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copies of every layer's (key, value) cache, for parity checks."""

    def close(self) -> None:
        """Free what the runtime holds (sessions, contexts, streams). The engine cannot step afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_slots(self, state_batch: int, row: int, start: int, count: int) -> None:
        if not 0 <= row < state_batch:
            raise ValueError(f"row {row} outside [0, {state_batch}) (the state's batch)")
        if start < 0 or count < 1 or start + count > self.spec.max_context:
            raise ValueError(f"slots [{start}, {start + count}) are not a non-empty range inside the artifact's "
                             f"max_context {self.spec.max_context}")

    def _check_step(self, state_batch: int, input_ids: np.ndarray, write_indices: np.ndarray,
                    logits_indices: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Validate and normalise step inputs to contiguous int64 and an int ``first_row``; errors name the
        argument."""
        if isinstance(first_row, bool) or not isinstance(first_row, numbers.Integral) or not (
                0 <= first_row < state_batch):
            raise ValueError(f"first_row {first_row!r}: must be an integer in [0, {state_batch}) (the state's batch)")
        first_row = int(first_row)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        write_indices = np.ascontiguousarray(write_indices, dtype=np.int64)
        logits_indices = np.ascontiguousarray(logits_indices, dtype=np.int64)
        if input_ids.ndim != 2 or not 1 <= input_ids.shape[0] <= state_batch - first_row or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids has shape {input_ids.shape}; expected [rows, seq] with seq >= 1 and rows in "
                             f"[1, {state_batch - first_row}]: first_row {first_row} + rows must not exceed the "
                             f"state's batch {state_batch}")
        rows, seq = input_ids.shape
        if write_indices.shape != (rows,) or logits_indices.shape != (rows,):
            raise ValueError(f"write_indices {write_indices.shape} and logits_indices {logits_indices.shape} "
                             f"must both have shape ({rows},)")
        if (write_indices < 0).any() or (write_indices + seq > self.spec.max_context).any():
            raise ValueError(f"write_indices {write_indices.tolist()} + seq {seq} exceed the artifact's "
                             f"max_context {self.spec.max_context}")
        if (logits_indices < 0).any() or (logits_indices >= seq).any():
            raise ValueError(f"logits_indices {logits_indices.tolist()} must lie in [0, {seq})")
        if (input_ids < 0).any() or (input_ids >= self.spec.vocab_size).any():
            raise ValueError(f"input_ids hold a token id outside [0, {self.spec.vocab_size})")
        return input_ids, write_indices, logits_indices, first_row

"""The reference PyTorch model behind the ``Engine`` interface, so parity, the benchmark and the tests drive it
through the same loops (``engines.greedy``) as the engines they compare it with.

It lives in export/, where the reference meets the engines: ``reference`` knows nothing of engines, and
``engines`` never import torch's model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from engines.base import Engine, GraphSpec
from reference import CohereForCausalLM, load_model
from reference.model import KVCaches


@dataclasses.dataclass
class ReferenceState:
    batch: int
    caches: KVCaches  # per layer (key, value) ``[batch, kv_heads, max_context, head_dim]``, updated in place


class ReferenceEngine(Engine):
    """``CohereForCausalLM`` (on the CPU, in its own dtype) on its static caches; numpy in, float32 logits out."""

    backend = "reference"

    def __init__(self, model: CohereForCausalLM, max_batch: int, max_context: int):
        c = model.config
        self.model = model
        self.spec = GraphSpec(num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                              head_dim=c.head_dim, vocab_size=c.vocab_size, max_batch=max_batch,
                              max_context=max_context, dtype=str(model.dtype).removeprefix("torch."))

    @classmethod
    def load(cls, model: str | Path, max_batch: int, max_context: int,
             dtype: torch.dtype = torch.float32) -> "ReferenceEngine":
        """From a preset name, a checkpoint folder or a hub id, as ``reference.load_model`` reads them."""
        return cls(load_model(model, dtype)[0], max_batch, max_context)

    def allocate(self, batch: int) -> ReferenceState:
        if not 1 <= batch <= self.spec.max_batch:
            raise ValueError(f"batch {batch} outside [1, max_batch={self.spec.max_batch}] of this engine")
        return ReferenceState(batch, self.model.new_caches(batch, self.spec.max_context))

    def _step(self, state: ReferenceState, input_ids, write_indices, logits_indices) -> np.ndarray:
        rows = input_ids.shape[0]
        caches = state.caches
        if rows < state.batch:  # views of the first `rows` rows: the model writes through them into the state
            caches = [(k[:rows], v[:rows]) for k, v in caches]
        with torch.inference_mode():
            logits, _ = self.model(torch.from_numpy(input_ids), torch.from_numpy(write_indices),
                                   torch.from_numpy(logits_indices), caches)
        return logits.numpy()

    def _save_slots(self, state: ReferenceState, row: int, start: int, count: int) -> torch.Tensor:
        """``[layers * 2, kv_heads, count, head_dim]``: every layer's key then value slots."""
        return torch.stack([cache[row, :, start:start + count] for pair in state.caches for cache in pair])

    def _load_slots(self, state: ReferenceState, row: int, start: int, block: torch.Tensor) -> None:
        count = block.shape[2]
        for cache, slots in zip((cache for pair in state.caches for cache in pair), block):
            cache[row, :, start:start + count].copy_(slots)

    def _block_count(self, block: torch.Tensor) -> int:
        return block.shape[2]

    def read_cache(self, state: ReferenceState) -> list[tuple[np.ndarray, np.ndarray]]:
        """float32 copies (numpy has no bfloat16)."""
        return [(k.to(torch.float32, copy=True).numpy(), v.to(torch.float32, copy=True).numpy())
                for k, v in state.caches]

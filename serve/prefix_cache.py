"""Automatic prefix caching, as vLLM's (docs: "Automatic Prefix Caching") and TGI's prefix cache: the KV of prompt
blocks already computed is copied into a new sequence's cache row instead of being prefilled again.

A prompt is cut into blocks of ``BLOCK_TOKENS`` tokens. A block's key is a hash of every token from position 0 to
its end (a chain: the previous block's key and this block's tokens, as vLLM), so equal keys mean equal tokens at
equal positions, hence (for one model) equal keys and values in the cache. Only full blocks of a prompt are
stored, after its prefill; a new prompt reuses its longest run of cached blocks from position 0, and at most
``len(prompt) - 1`` tokens, since its last token must still run to give the logits of the first new token.

The store holds engine blocks (``Engine.save_slots``) on the engine's device, at most ``capacity_bytes`` of them,
and evicts the least recently used first. As vLLM's free-block queue, a sequence touches its blocks from the last
to the first, so a prefix's parent is more recent than its children and a chain is evicted from its tail, never
leaving an unreachable child behind a missing parent.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading

import numpy as np

from engines import Engine

log = logging.getLogger(__name__)

BLOCK_TOKENS = 64


@dataclasses.dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens of the sequences looked up
    hit_tokens: int = 0  # of those, tokens whose KV came from the store instead of a prefill
    entries: int = 0
    bytes: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Reused prompt tokens per prompt token looked up (vLLM's prefix cache hit rate)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    """Blocks of prompt KV keyed by their token prefix, bounded by ``capacity_bytes``. Thread-safe: several
    Generator calls and the scheduler thread may share one."""

    def __init__(self, bytes_per_slot: int, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if capacity_bytes < 0 or block_tokens < 1:
            raise ValueError(f"prefix cache: capacity {capacity_bytes} bytes and block of {block_tokens} tokens: "
                             "need a capacity >= 0 and a block of at least one token")
        self.block_tokens = block_tokens
        self.block_bytes = bytes_per_slot * block_tokens
        self.capacity_bytes = capacity_bytes
        self._blocks: collections.OrderedDict[bytes, object] = collections.OrderedDict()  # least recent first
        self._stats = PrefixCacheStats()
        self._lock = threading.Lock()
        if capacity_bytes < self.block_bytes:
            log.warning("prefix cache: %d bytes hold no block of %d tokens (%d bytes); nothing will be cached",
                        capacity_bytes, block_tokens, self.block_bytes)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return dataclasses.replace(self._stats, entries=len(self._blocks),
                                       bytes=len(self._blocks) * self.block_bytes)

    def _keys(self, prompt_ids: list[int], blocks: int) -> list[bytes]:
        """The chain keys of the first ``blocks`` full blocks of a prompt."""
        keys, key = [], b""
        tokens = np.asarray(prompt_ids, dtype=np.int64)
        for b in range(blocks):
            key = hashlib.sha256(key + tokens[b * self.block_tokens:(b + 1) * self.block_tokens].tobytes()).digest()
            keys.append(key)
        return keys

    def load(self, engine: Engine, state, row: int, prompt_ids: list[int]) -> int:
        """Write the longest cached prefix of ``prompt_ids`` into slots ``[0, n)`` of ``row``; returns ``n`` (a
        multiple of the block, at most ``len(prompt_ids) - 1``, 0 on a miss)."""
        with self._lock:
            self._stats.queried_tokens += len(prompt_ids)
            found = []
            for key in self._keys(prompt_ids, (len(prompt_ids) - 1) // self.block_tokens):
                if key not in self._blocks:
                    break
                found.append(key)
            for key in reversed(found):  # the last block first: parents end up more recent than children
                self._blocks.move_to_end(key)
            blocks = [self._blocks[key] for key in found]
            self._stats.hit_tokens += len(blocks) * self.block_tokens
        # Outside the lock: an evicted block stays alive while referenced here, and copies may take a while.
        for b, block in enumerate(blocks):
            engine.load_slots(state, row, b * self.block_tokens, block)
        return len(blocks) * self.block_tokens

    def store(self, engine: Engine, state, row: int, prompt_ids: list[int]) -> None:
        """Keep the full blocks of a prompt whose prefill into ``row`` has just completed."""
        most = self.capacity_bytes // self.block_bytes
        if not most:
            return
        keys = self._keys(prompt_ids, len(prompt_ids) // self.block_tokens)[:most]
        with self._lock:
            missing = [b for b, key in enumerate(keys) if key not in self._blocks]
        saved = {b: engine.save_slots(state, row, b * self.block_tokens, self.block_tokens) for b in missing}
        with self._lock:
            for b in reversed(range(len(keys))):  # the last block first, as in load
                if b in saved and keys[b] not in self._blocks:
                    self._blocks[keys[b]] = saved[b]
                if keys[b] in self._blocks:
                    self._blocks.move_to_end(keys[b])
            while len(self._blocks) > most:
                self._blocks.popitem(last=False)
                self._stats.evictions += 1

"""The reference PyTorch model behind the ``Engine`` interface, so parity, the benchmark and the tests drive it
through the same loops (``engines.greedy``) as the engines they compare it with.

It lives in export/, where the reference meets the engines: ``reference`` knows nothing of engines, and
``engines`` never import torch's model.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engines.base import Engine, GraphSpec
from reference import CheckpointError, CohereConfig, CohereForCausalLM, load_model
from reference.model import KVCaches
from reference.quantize import WeightQuantization, quantized_linear_weights
from reference.weights import _set_parameter, all_finite, check_checkpoint, non_finite_message


RoundTrip = tuple[WeightQuantization, torch.dtype]  # a quantization and the dtype of its scales


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

    def _step(self, state: ReferenceState, input_ids, write_indices, logits_indices, first_row: int) -> np.ndarray:
        rows = input_ids.shape[0]
        caches = state.caches
        if rows < state.batch:  # views of the stepped rows: the model writes through them into the state
            caches = [(k[first_row:first_row + rows], v[first_row:first_row + rows]) for k, v in caches]
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


class StreamedReferenceEngine(ReferenceEngine):
    """The fp32 reference that holds no layer's weights between uses, so verifying an artifact costs about what
    running it costs: the model skeleton lives on the ``meta`` device, and each step materialises one module's
    weights at a time from the checkpoint (the embedding rows the step reads, each decoder layer, the final norm,
    the LM head in chunks of vocabulary rows), runs it, and drops them before the next.

    The step runs the reference's own ``forward`` on the same weights converted the same way, so its logits and
    caches equal ``ReferenceEngine`` on the loaded fp32 model bit for bit. Only the LM head is split by vocabulary
    rows: each logit is still the dot product of one weight row with the hidden state, but BLAS may pick another
    kernel for a chunk's product, whose sum rounds differently in the last bit (about 1e-7 relative, a thousandth
    of the fp32 parity tolerance).
    """

    def __init__(self, folder: Path, config: CohereConfig, max_batch: int, max_context: int,
                 lm_head_rows: int = 8192, quantized: RoundTrip | None = None):
        """``quantized``: run the weights an int8/int4 artifact multiplies by (each projection quantized and
        dequantized as it is read), the reference such an artifact is held exact against."""
        files = check_checkpoint(folder, config)  # headers only: names, shapes and dtypes, before any step
        with torch.device("meta"):
            model = _StreamedCohere(config, files, lm_head_rows, quantized)
        super().__init__(model.eval().requires_grad_(False), max_batch, max_context)

    @property
    def largest_resident_bytes(self) -> int:
        """The most fp32 weight bytes held at once so far: the largest decoder layer, or LM head chunk, or the
        embedding rows of one step (while one tensor converts, its stored copy is held as well)."""
        return self.model.largest_resident_bytes


class _StreamedCohere(CohereForCausalLM):
    """``CohereForCausalLM`` on the meta device whose modules read their weights from the checkpoint when they run
    (forward hooks) and give them back to the meta device when done."""

    def __init__(self, config: CohereConfig, files: dict[str, Path], lm_head_rows: int, quantized: RoundTrip | None):
        super().__init__(config)
        self.files = files
        self.lm_head_rows = lm_head_rows
        self.quantized = quantized
        self.quantized_names = set(quantized_linear_weights(config.num_hidden_layers)) if quantized else set()
        self.largest_resident_bytes = 0
        self.model.embed_tokens.register_forward_pre_hook(self._embedding_rows)
        self.model.embed_tokens.register_forward_hook(self._release)
        for prefix, module in [*((f"model.layers.{i}.", layer) for i, layer in enumerate(self.model.layers)),
                               ("model.norm.", self.model.norm)]:
            module.register_forward_pre_hook(functools.partial(self._materialise, prefix))
            module.register_forward_hook(self._release)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what every weight read is converted to, as ``load_checkpoint(folder, float32)`` does

    def new_caches(self, batch: int, max_context: int) -> KVCaches:
        """On the CPU: the caches live for the whole run, unlike the weights, so not on the skeleton's meta device."""
        c = self.config
        shape = (batch, c.num_key_value_heads, max_context, c.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device="cpu"), torch.zeros(shape, dtype=self.dtype,
                                                                                 device="cpu"))
                for _ in range(c.num_hidden_layers)]

    def _read(self, name: str, rows: list[slice] | None = None) -> torch.Tensor:
        """One tensor (or the ranges ``rows`` of its rows, concatenated) in fp32, refused by name if it holds NaN or
        infinity, as ``load_weights`` refuses it."""
        path = self.files[name]
        with safe_open(path, framework="pt") as f:  # opened per read: a long-lived mmap would count every page read
            if rows is None:
                stored = f.get_tensor(name)
            else:
                stored = torch.cat([f.get_slice(name)[r] for r in rows])
        value = stored.to(self.dtype)
        if not all_finite(value):
            raise CheckpointError(non_finite_message(path, name, stored, value))
        return value

    def _round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        quantization, scale_dtype = self.quantized
        return quantization.round_trip(weight, scale_dtype)

    def _note_resident(self, lm_head_chunk: torch.Tensor | None = None) -> None:
        """Counts every weight materialised now, so a module left materialised would show in the figure."""
        held = sum(p.nbytes for p in self.parameters() if not p.is_meta)
        held += lm_head_chunk.nbytes if lm_head_chunk is not None else 0
        self.largest_resident_bytes = max(self.largest_resident_bytes, held)

    def _materialise(self, prefix: str, module: torch.nn.Module, args: tuple) -> None:
        for name, _ in list(module.named_parameters()):
            value = self._read(prefix + name)
            _set_parameter(module, name, self._round_trip(value) if prefix + name in self.quantized_names else value)
        self._note_resident()

    def _embedding_rows(self, module: torch.nn.Embedding, args: tuple) -> tuple:
        """Only the rows of the step's tokens, each read on its own (a safetensors slice is a range): the module
        then looks up the same values in a table of those rows."""
        (input_ids,) = args
        tokens, positions = torch.unique(input_ids, return_inverse=True)
        name = "model.embed_tokens.weight"
        module.weight = torch.nn.Parameter(self._read(name, [slice(t, t + 1) for t in tokens.tolist()]),
                                           requires_grad=False)
        self._note_resident()
        return (positions,)

    def _release(self, module: torch.nn.Module, args: tuple, output) -> None:
        for name, parameter in list(module.named_parameters()):
            _set_parameter(module, name, torch.empty_like(parameter, device="meta"))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``CohereForCausalLM.logits`` by chunks of vocabulary rows, each read from the checkpoint when used."""
        name = "lm_head.weight" if "lm_head.weight" in self.files else "model.embed_tokens.weight"
        chunks = []
        for start in range(0, self.config.vocab_size, self.lm_head_rows):
            weight = self._read(name, [slice(start, start + self.lm_head_rows)])
            if self.quantized:  # blocks run along the hidden size, so a chunk of vocabulary rows quantizes alone
                weight = self._round_trip(weight)
            self._note_resident(weight)
            chunks.append(self.scaled_logits(h, weight))
        return torch.cat(chunks, dim=-1)

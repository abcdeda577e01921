"""Write a graph's weights into its external-data file one tensor at a time, in blocks, from where they are stored.

A source is a checkpoint folder (its safetensors shards) or an in-memory model's state dict; either way each
tensor is converted to the target dtype (and transposed where the graph multiplies by ``W^T``) a block of at most
``BLOCK_BYTES`` at a time, so an export holds one block, never the model. Shards are memory-mapped and each
tensor's pages are dropped from this process (``MADV_DONTNEED``) after every block: pages read through a mapping
count in the process's resident memory until it lets them go, and a shard is gigabytes.

The graph refers to its weights through ``WeightTensor`` initializers, lazy tensors that the optimiser may read
whole only when small (norm weights it casts to fp32); ``write_external_data`` then streams every initializer
into the data file and points the graph at it.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnxscript import ir
from tqdm import tqdm

from reference.config import CohereConfig
from reference.quantize import WeightQuantization, pack_int4
from reference.weights import INDEX_FILE, CheckpointError, all_finite, check_checkpoint, non_finite_message

BLOCK_BYTES = 16 << 20  # what one conversion step holds, in the target dtype
# Tensors the optimiser may read whole: its constant folding never reads an input larger than this many values
# (onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT), except for a Transpose, which the export folds itself.
WHOLE_READ_LIMIT = 8192
INLINE_BYTES = 256  # smaller tensors stay in the graph file, as ir.save(external_data=...) keeps them
# Large tensors start at 64 KiB offsets, onnx_ir's former default: ONNX Runtime can then map them in place.
ALIGNMENT, ALIGN_ABOVE = 65536, 1 << 20
MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too

_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_IR_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16}


@dataclass(frozen=True)
class _Entry:
    path: Path
    stored: str  # safetensors dtype code
    shape: tuple[int, ...]
    begin: int  # byte offset of the data in the file
    end: int


class WeightSource:
    """Named tensors that can be read in blocks, converted to a dtype and optionally transposed (2-D only)."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def blocks(self, name: str, dtype: torch.dtype, transpose: bool, align: int = 1) -> Iterator[torch.Tensor]:
        """C-ordered pieces whose concatenation is the row-major data of the converted (transposed) tensor. A
        transposed tensor comes in bands of whole rows, a multiple of ``align`` rows each but the last."""
        raise NotImplementedError

    def read(self, name: str, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
        shape = self.shape(name)
        pieces = [piece.reshape(-1) for piece in self.blocks(name, dtype, transpose)]
        return torch.cat(pieces).reshape(shape[::-1] if transpose else shape)


def _pieces(array: np.ndarray, stored: torch.dtype, dtype: torch.dtype, transpose: bool, align: int,
            where: Path | str, name: str) -> Iterator[torch.Tensor]:
    """Blocks of ``array`` (raw storage, ``stored`` reinterpreted), converted with torch as ``Tensor.to`` converts
    an in-memory model, so the bytes equal those of the in-memory export. A block holding NaN or infinity, or a
    value the conversion overflows, is refused naming the tensor (``where`` is its file), as the reference loader
    refuses it: an artifact built from it would give NaN logits."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if transpose:  # W^T [cols, rows] is produced a band of W's columns at a time
        rows, cols = array.shape
        width = max(align, BLOCK_BYTES // (itemsize * max(rows, 1)) // align * align)
        spans = [(array[:, c:c + width].T) for c in range(0, cols, width)]
    else:
        flat = array.reshape(-1)
        step = max(1, BLOCK_BYTES // itemsize)
        spans = [flat[i:i + step] for i in range(0, flat.size, step)]
    for span in spans:
        piece = torch.from_numpy(np.array(span, order="C")).view(stored)  # a copy: the mapping is read-only
        converted = piece.to(dtype)
        if not all_finite(converted):
            raise CheckpointError(non_finite_message(where, name, piece, converted))
        yield converted


class CheckpointWeights(WeightSource):
    """The tensors of an HF safetensors checkpoint folder (one file or shards with an index), read from disk.
    Refused at once, with the reference loader's messages, unless they are exactly the parameters of ``config``'s
    model (names and shapes) in a float dtype; a tied checkpoint's extra lm_head copy is ignored as there."""

    def __init__(self, folder: Path, config: CohereConfig):
        self.folder = folder
        files = check_checkpoint(folder, config)  # names, shapes and float dtypes against the config, from headers
        headers = {path: _read_header(path) for path in sorted(set(files.values()))}  # where each tensor's data is
        for name, path in files.items():
            if name not in headers[path]:
                raise CheckpointError(f"{path}: has no tensor {name}, which {INDEX_FILE} places there")
        self.entries = {name: headers[path][name] for name, path in files.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def blocks(self, name: str, dtype: torch.dtype, transpose: bool, align: int = 1) -> Iterator[torch.Tensor]:
        entry = self.entries[name]
        stored = _STORED[entry.stored]
        raw = np.dtype(f"<i{stored.itemsize}")
        first = entry.begin // mmap.PAGESIZE * mmap.PAGESIZE
        refused = None
        with open(entry.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            array = np.frombuffer(mapped, dtype=raw, count=math.prod(entry.shape), offset=entry.begin)
            pieces = _pieces(array.reshape(entry.shape), stored, dtype, transpose, align, entry.path, name)
            try:
                for piece in pieces:
                    mapped.madvise(mmap.MADV_DONTNEED, first, entry.end - first)
                    yield piece
            except CheckpointError as e:
                # Raised again once the mapping is closed: the error's traceback holds the frames that view it.
                refused = str(e)
            finally:
                pieces.close()  # the mapping cannot close while a view of it exists
                del pieces, array
        if refused is not None:
            raise CheckpointError(refused)


def _read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file: 8 bytes little-endian header length, a JSON header mapping each name
    to its dtype, shape and data offsets, then the data."""
    def unreadable(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise unreadable("shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise unreadable(f"header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as e:
            raise unreadable(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise unreadable("header is not a JSON object")
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            stored, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = (isinstance(stored, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size - data_start)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise unreadable(f"tensor {name}: bad dtype, shape or data_offsets {info!r}")
        if stored in _STORED and end - begin != math.prod(shape) * _STORED[stored].itemsize:
            raise unreadable(f"tensor {name}: {end - begin} bytes for shape {list(shape)} of {stored}")
        entries[name] = _Entry(path, stored, shape, data_start + begin, data_start + end)
    return entries


class StateDictWeights(WeightSource):
    """The tensors of an in-memory model, so that a model built in Python exports through the same writer."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.tensors = {name: t.detach() for name, t in state_dict.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def blocks(self, name: str, dtype: torch.dtype, transpose: bool, align: int = 1) -> Iterator[torch.Tensor]:
        tensor = self.tensors[name].contiguous()
        raw = tensor.view(getattr(torch, f"int{8 * tensor.element_size()}")).numpy()
        yield from _pieces(raw, tensor.dtype, dtype, transpose, align, "the in-memory model", name)


class StreamedTensor(ir.LazyTensor):
    """A graph initializer whose data is produced from a source tensor when the graph is written, block by block."""

    def blocks(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class WeightTensor(StreamedTensor):
    """A source tensor converted to ``dtype`` (and transposed); read whole only if small, when the optimiser folds
    an op over it."""

    def __init__(self, source: WeightSource, key: str, dtype: torch.dtype, transpose: bool = False,
                 name: str | None = None):
        shape = source.shape(key)
        if transpose and len(shape) != 2:
            raise ValueError(f"{key}: only a 2-D weight can be transposed, not shape {shape}")
        self.source, self.key, self.torch_dtype, self.transpose = source, key, dtype, transpose
        super().__init__(self._read_whole, dtype=_IR_DTYPES[dtype], shape=ir.Shape(shape[::-1] if transpose else shape),
                         name=name)

    def _read_whole(self) -> ir.Tensor:
        if self.size > WHOLE_READ_LIMIT:  # would hold a whole weight in memory: a bug of the export, not of input
            raise RuntimeError(f"weight {self.key} ({self.size} values) was read whole; it must be streamed")
        return ir.Tensor(self.source.read(self.key, self.torch_dtype, self.transpose).numpy())

    def blocks(self) -> Iterator[torch.Tensor]:
        return self.source.blocks(self.key, self.torch_dtype, self.transpose)


class QuantizedWeight(StreamedTensor):
    """``W^T`` of the source weight ``key`` (``[N, K]``) quantized (``reference.quantize``): the integers
    ``[K, N]`` (INT8, or INT4 packed two to a byte) or, with ``scales=True``, the scales ``[ceil(K / block), N]``
    in ``scale_dtype``. The weight is read in fp32 a band of whole blocks at a time; the integers and the scales
    each read it once, so neither holds more than a band."""

    def __init__(self, source: WeightSource, key: str, quantization: WeightQuantization, scale_dtype: torch.dtype,
                 scales: bool, name: str):
        outputs, inputs = source.shape(key)
        self.source, self.key, self.quantization, self.scale_dtype, self.scales = (
            source, key, quantization, scale_dtype, scales)
        if scales:
            dtype, shape = _IR_DTYPES[scale_dtype], (quantization.blocks(inputs), outputs)
        else:
            dtype, shape = (ir.DataType.INT4 if quantization.bits == 4 else ir.DataType.INT8), (inputs, outputs)
        super().__init__(self._refuse_whole_read, dtype=dtype, shape=ir.Shape(shape), name=name)

    def _refuse_whole_read(self) -> ir.Tensor:
        raise RuntimeError(f"quantized weight {self.key} was read whole; it must be streamed")

    def blocks(self) -> Iterator[torch.Tensor]:
        outputs = self.source.shape(self.key)[0]
        for band in self.source.blocks(self.key, torch.float32, True, align=self.quantization.block_size):
            q, scale = self.quantization.quantize(band.reshape(-1, outputs), self.scale_dtype)
            yield scale if self.scales else (pack_int4(q) if self.quantization.bits == 4 else q)


def write_external_data(graph: ir.Graph, folder: Path, data_file: str) -> None:
    """Write every initializer of ``graph`` of at least ``INLINE_BYTES`` into ``folder/data_file``, in graph
    order, and make it an ``ir.ExternalTensor`` pointing there; smaller ones stay in the graph file."""
    values = [v for v in graph.initializers.values() if v.const_value is not None]
    total = sum(v.const_value.nbytes for v in values)
    offset = 0
    with open(folder / data_file, "wb") as out, tqdm(total=total, desc="writing weights", unit="B", unit_scale=True,
                                                     disable=None, leave=False) as progress:
        for value in values:
            tensor = value.const_value
            if tensor.nbytes < INLINE_BYTES and not isinstance(tensor, QuantizedWeight):
                if isinstance(tensor, WeightTensor):
                    value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
                progress.update(tensor.nbytes)
                continue
            if tensor.nbytes > ALIGN_ABOVE and offset % ALIGNMENT:
                padding = ALIGNMENT - offset % ALIGNMENT
                out.write(bytes(padding))
                offset += padding
            begin = offset
            for piece in (tensor.blocks() if isinstance(tensor, StreamedTensor) else [tensor.numpy()]):
                data = piece.numpy() if isinstance(piece, torch.Tensor) else piece
                out.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                offset += data.nbytes
                progress.update(data.nbytes)
                del piece, data  # before the next block is read: one block at a time
            if offset - begin != tensor.nbytes:
                raise RuntimeError(f"{value.name}: wrote {offset - begin} bytes, its shape needs {tensor.nbytes}")
            value.const_value = ir.ExternalTensor(data_file, begin, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=folder)

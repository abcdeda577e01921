"""Weight-only quantization: the numbers an int8 or int4 artifact multiplies by, defined once.

A linear layer ``y = x @ W^T`` keeps ``W^T [K, N]`` (K inputs, N outputs) as integers ``q`` and one scale per block
of ``block_size`` consecutive inputs of each output, ``scale [ceil(K / block_size), N]`` in the activation dtype:

    W^T[k, n] ≈ q[k, n] * scale[k // block_size, n]

Symmetric (no zero point: TensorRT's dequantize layer takes none), round to nearest, ``q`` in ``[-qmax, qmax]``
(127 for int8, 7 for int4). This is ONNX's blocked ``DequantizeLinear`` (axis 0) feeding the layer's ``MatMul``;
``export`` writes it and the reference runs the same dequantized weights, so an int4 engine can be held to fp32
exactness against ``dequantize(quantize(W))`` and, separately, measured against the unquantized model.

The last block of a dimension that ``block_size`` does not divide is shorter, as ONNX's blocked quantization
defines it (the scale's size on the axis is ``ceil(K / block_size)``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)
METHODS = ("rtn",)  # round to nearest


@dataclasses.dataclass(frozen=True)
class WeightQuantization:
    bits: int
    block_size: int = 32
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits {self.bits}: choose one of {BITS}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size}: choose one of {BLOCK_SIZES}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {METHODS}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def blocks(self, rows: int) -> int:
        return math.ceil(rows / self.block_size)

    def quantize(self, w_t: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scale)`` of ``w_t [K, N]``: ``q`` int8 ``[K, N]`` (int4 values stay in [-7, 7]), ``scale``
        ``[ceil(K / block_size), N]`` in ``scale_dtype``. Rows ``[0, K)`` may be any run of whole blocks of a larger
        weight (the export quantizes a weight a band of blocks at a time): the result is the same."""
        w = w_t.float()
        rows, cols = w.shape
        padded = torch.nn.functional.pad(w, (0, 0, 0, self.blocks(rows) * self.block_size - rows))
        absmax = padded.view(-1, self.block_size, cols).abs().amax(dim=1)
        # Rounded to the stored dtype before dividing, so q is computed against the scale that is stored. A block of
        # zeros gets the smallest normal scale: TensorRT requires every scale to be positive.
        scale = (absmax / self.qmax).to(scale_dtype).clamp_min(torch.finfo(scale_dtype).tiny)
        expanded = scale.float().repeat_interleave(self.block_size, dim=0)[:rows]
        q = torch.round(w / expanded).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return q, scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``q * scale`` in fp32, ``[K, N]`` (exact: a 4- or 8-bit integer times a fp16/fp32 scale fits fp32)."""
        return q.float() * scale.float().repeat_interleave(self.block_size, dim=0)[:q.shape[0]]

    def round_trip(self, weight: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
        """The fp32 values an artifact multiplies by for the ``nn.Linear`` weight ``[N, K]`` (not transposed)."""
        return self.dequantize(*self.quantize(weight.float().T, scale_dtype)).T.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (int8 in [-8, 7]) packed two to a byte in row-major order, the first in the low nibble, as ONNX
    stores INT4 tensors; an odd count is padded with a zero nibble."""
    flat = q.reshape(-1).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def quantized_linear_weights(num_layers: int) -> list[str]:
    """The checkpoint tensors whose layers multiply by quantized weights: every attention and MLP projection.
    The output projection is quantized too (``lm_head.weight``, or a quantized copy of the tied embedding, whose
    lookup stays in float); norms and the embedding lookup stay in float."""
    names = []
    for i in range(num_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names


def round_trip_model(model: torch.nn.Module, quantization: WeightQuantization, scale_dtype: torch.dtype) -> None:
    """Replace, in place, every weight an artifact quantizes by the values it dequantizes to: the reference an int8
    or int4 engine is held exact against. A tied model gets its own LM head holding the quantized copy of the
    embedding, as the artifact has; the embedding lookup keeps the float table."""
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name in quantized_linear_weights(model.config.num_hidden_layers):
            parameters[name].copy_(quantization.round_trip(parameters[name], scale_dtype))
        head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        weight = quantization.round_trip(head, scale_dtype).to(head.dtype)
        if model.lm_head is None:
            model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, device=head.device,
                                            dtype=head.dtype)
        model.lm_head.weight.copy_(weight)

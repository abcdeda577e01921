"""How much memory an artifact needs where it runs, from the model config and the artifact's shape alone.

A static KV cache is allocated whole: ``max_batch × max_context`` slots per layer, keys and values, whatever the
requests are. At Command-R's size that is the bulk of the memory (1.3 MB per token: 86 GB for 8 rows of 8192
tokens, beside 70 GB of fp16 weights), so export checks the plan before any work and serving checks it again on
load, instead of failing with an out-of-memory error at the first request.

    plan = MemoryPlan.for_config(config, "float16", max_batch=8, max_context=8192, device="cuda",
                                 budget_bytes=80 * 2**30)
    plan.fits, plan.largest_batch(), plan.largest_context(), plan.table()
"""

from __future__ import annotations

import dataclasses
import os

DTYPE_BYTES = {"float16": 2, "float32": 4}
# Per step, one prefill chunk of this many tokens per row is the largest activation a plan provisions for: the
# HTTP scheduler prefills long prompts in chunks of at most this (serve/scheduler.py PREFILL_CHUNK is smaller).
PLANNED_PREFILL_TOKENS = 512
# What a runtime holds besides weights, cache and activations: the CUDA context, cuBLAS/TensorRT workspaces, or
# ONNX Runtime's arena and the interpreter. Measured figures are in the README's memory table.
RUNTIME_BYTES = {"cuda": 2 * 2**30, "cpu": 512 * 2**20}
# Of the device's free memory, what a plan may use: the rest is headroom for fragmentation and other processes.
BUDGET_FRACTION = 0.9


def weight_count(config: dict) -> int:
    """Parameters of a CohereForCausalLM with this config (``CohereConfig.to_dict()``), lm_head included when
    untied."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o; k and v
    qk_norm = (heads + kv_heads) * head_dim if config.get("use_qk_norm") else 0
    per_layer = attention + 3 * hidden * inter + hidden + qk_norm  # MLP gate/up/down; the block norm
    embedding = config["vocab_size"] * hidden
    lm_head = 0 if config.get("tie_word_embeddings", True) else embedding
    return embedding + layers * per_layer + hidden + lm_head


def quantized_weight_bytes(config: dict, dtype: str, bits: int, block_size: int) -> int:
    """Bytes of an artifact whose projections are ``bits``-bit integers with one ``dtype`` scale per ``block_size``
    inputs (reference/quantize.py): the embedding table and the norms stay in ``dtype``, and the LM head is a
    quantized copy of the embedding when tied."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def quantized(inputs: int, outputs: int) -> int:
        return -(-inputs * outputs * bits // 8) + -(-inputs // block_size) * outputs * DTYPE_BYTES[dtype]

    per_layer = (quantized(hidden, heads * head_dim) * 2 + quantized(hidden, kv_heads * head_dim) * 2
                 + quantized(hidden, inter) * 2 + quantized(inter, hidden))
    projections = layers * per_layer + quantized(hidden, config["vocab_size"])
    floats = weight_count(config) - layers * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * inter)
    if not config.get("tie_word_embeddings", True):
        floats -= config["vocab_size"] * hidden  # the untied head is quantized, not kept
    return projections + floats * DTYPE_BYTES[dtype]


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """Keys and values of one token, every layer."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * DTYPE_BYTES[dtype]


def activation_bytes_per_row(config: dict, dtype: str, max_context: int) -> int:
    """The largest live activations of one row in one step: a prefill chunk's hidden states, its MLP intermediates
    (gate and up), and its float32 logits row."""
    tokens = min(PLANNED_PREFILL_TOKENS, max_context)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return tokens * (4 * hidden + 2 * inter) * DTYPE_BYTES[dtype] + 4 * config["vocab_size"]


def free_memory(device: str) -> int | None:
    """Bytes the device can still give: free GPU memory (through torch, when it has CUDA), or the host's
    MemAvailable. None when it cannot be told."""
    if device == "cuda":
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
    return pages * os.sysconf("SC_PAGE_SIZE") if pages else None


def default_budget(device: str) -> int | None:
    free = free_memory(device)
    return None if free is None else int(free * BUDGET_FRACTION)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cuda" (TensorRT, ONNX Runtime CUDA) or "cpu"
    dtype: str
    max_batch: int
    max_context: int
    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_row: int
    runtime_bytes: int
    budget_bytes: int | None  # what the device offers the plan; None: unknown, not checked

    @classmethod
    def for_config(cls, config: dict, dtype: str, max_batch: int, max_context: int, device: str,
                   budget_bytes: int | None, weight_bytes: int | None = None) -> "MemoryPlan":
        """``weight_bytes``: the artifact's own figure when known (its weights file); else from the config."""
        return cls(device=device, dtype=dtype, max_batch=max_batch, max_context=max_context,
                   weight_bytes=weight_count(config) * DTYPE_BYTES[dtype] if weight_bytes is None else weight_bytes,
                   kv_bytes_per_token=kv_bytes_per_token(config, dtype),
                   activation_bytes_per_row=activation_bytes_per_row(config, dtype, max_context),
                   runtime_bytes=RUNTIME_BYTES[device], budget_bytes=budget_bytes)

    @property
    def kv_bytes_per_row(self) -> int:
        return self.kv_bytes_per_token * self.max_context

    def total_bytes(self, max_batch: int | None = None, max_context: int | None = None) -> int:
        batch = self.max_batch if max_batch is None else max_batch
        context = self.max_context if max_context is None else max_context
        return (self.weight_bytes + self.runtime_bytes
                + batch * (self.kv_bytes_per_token * context + self.activation_bytes_per_row))

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.total_bytes() <= self.budget_bytes

    def largest_batch(self) -> int:
        """The most rows of ``max_context`` tokens that fit the budget (0: not even one)."""
        room = self.budget_bytes - self.weight_bytes - self.runtime_bytes
        return max(0, room // (self.kv_bytes_per_row + self.activation_bytes_per_row))

    def largest_context(self) -> int:
        """The longest context that fits the budget at ``max_batch`` rows (0: none)."""
        room = self.budget_bytes - self.weight_bytes - self.runtime_bytes
        per_row = room // self.max_batch - self.activation_bytes_per_row
        return max(0, per_row // self.kv_bytes_per_token)

    def refusal(self) -> str | None:
        """Why the plan does not fit, and what would; None when it fits (or the budget is unknown)."""
        if self.fits:
            return None
        gib = 2**30
        fixed = self.weight_bytes + self.runtime_bytes
        if fixed > self.budget_bytes:
            return (f"the weights alone ({self.weight_bytes / gib:.1f} GiB {self.dtype}) plus the runtime "
                    f"({self.runtime_bytes / gib:.1f} GiB) exceed the {self.device} budget of "
                    f"{self.budget_bytes / gib:.1f} GiB: use a device with more memory (or a quantized artifact)")
        return (f"max_batch {self.max_batch} x max_context {self.max_context} needs "
                f"{self.total_bytes() / gib:.1f} GiB on {self.device} (weights {self.weight_bytes / gib:.1f} GiB, "
                f"KV cache {self.max_batch * self.kv_bytes_per_row / gib:.1f} GiB), over the budget of "
                f"{self.budget_bytes / gib:.1f} GiB. What fits: "
                + (f"--max-batch {self.largest_batch()} at this --max-context, or " if self.largest_batch() else
                   f"not one row of {self.max_context} tokens; ")
                + f"--max-context {self.largest_context()} at this --max-batch")

    def on_loaded_device(self, device: str) -> "MemoryPlan | None":
        """This plan where an engine has just loaded the weights on ``device``: the budget is what the device has
        free now (less the margin) plus the weights already in it. None when free memory cannot be told."""
        free = free_memory(device)
        if free is None:
            return None
        return dataclasses.replace(self, device=device, runtime_bytes=RUNTIME_BYTES[device],
                                   budget_bytes=int(free * BUDGET_FRACTION) + self.weight_bytes)

    def table(self) -> str:
        """The plan as lines a user reads in the export log."""
        gib = 2**30
        budget = "unknown" if self.budget_bytes is None else f"{self.budget_bytes / gib:.2f} GiB"
        rows = [("weights", self.weight_bytes),
                (f"KV cache ({self.max_batch} rows x {self.max_context} tokens x "
                 f"{self.kv_bytes_per_token / 2**10:.1f} KiB)", self.max_batch * self.kv_bytes_per_row),
                (f"activations ({self.max_batch} rows, prefill chunks of "
                 f"{min(PLANNED_PREFILL_TOKENS, self.max_context)} tokens, logits)",
                 self.max_batch * self.activation_bytes_per_row),
                ("runtime (workspaces, allocator, context)", self.runtime_bytes),
                ("total", self.total_bytes())]
        width = max(len(name) for name, _ in rows)
        lines = [f"memory plan on {self.device} ({self.dtype}), budget {budget}:"]
        lines += [f"  {name:<{width}}  {n / gib:10.3f} GiB" for name, n in rows]
        lines.append(f"  {'fits':<{width}}  {'yes' if self.fits else 'NO'}")
        return "\n".join(lines)

"""The reference Cohere decoder (``CohereForCausalLM``) in plain PyTorch: the single source of truth for numerics.

One forward serves prefill, decode and mixed batches, against an explicit static KV cache per layer of shape
``[batch, kv_heads, max_context, head_dim]``:

    logits, caches = model(input_ids, write_indices, logits_indices, caches)

- ``input_ids [batch, seq]``: the new tokens of every sequence, right-padded where sequences differ in length.
- ``write_indices [batch]``: the position of ``input_ids[:, 0]`` in each sequence, which is also where its keys
  and values are written into the cache. Rows may sit at different positions (ragged batches, late joiners).
- ``logits_indices [batch]``: which of the ``seq`` new tokens of each row to return logits for (its last real
  token); a 256k vocabulary times a long prompt would otherwise be gigabytes.

Query ``i`` of row ``b`` sees cache slots ``j <= write_indices[b] + i``. Slots written by padding lie beyond every
real token of that row, so they stay masked until a later step overwrites them.

Every op is chosen to export to a single ONNX operator TensorRT maps to a native layer (see export/onnx_graph.py):
``F.layer_norm`` → LayerNormalization, ``rotary_embedding`` → RotaryEmbedding, ``kv_cache_update`` →
TensorScatter, ``F.scaled_dot_product_attention`` with a boolean mask → a single-output Attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CohereConfig


class CohereLayerNorm(nn.Module):
    """Mean-centred LayerNorm with a weight and no bias, statistics in fp32 (as Cohere's).

    ``shape`` is ``(hidden,)`` for the block norms, or ``(heads, head_dim)`` for qk-norm, where every head has its
    own weight and statistics run over ``head_dim`` only.
    """

    def __init__(self, shape: tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary_tables(config: CohereConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[length, head_dim // 2]`` in fp32 for positions 0..length-1 (default, unscaled RoPE)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cohere's interleaved (GPT-J) rotation of ``x [batch, heads, seq, head_dim]`` at ``positions [batch, seq]``,
    computed in fp32: pairs ``(x[2i], x[2i+1])`` rotate by ``positions * inv_freq[i]``."""
    y = torch.onnx.ops.rotary_embedding(x.float(), cos, sin, positions, interleaved=True)
    return y.to(x.dtype)


def kv_cache_update(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """Write ``update [batch, kv_heads, seq, head_dim]`` into ``cache`` at ``write_indices[b] + (0..seq-1)``.

    Eagerly the cache is updated in place and returned (a static cache, as in gpt-fast); under ONNX export this
    is one ``TensorScatter`` (opset 24, linear mode), which TensorRT maps to its KV-cache update layer.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            "::TensorScatter", (cache, update, write_indices), dict(axis=2, mode="linear"),
            dtype=cache.dtype, shape=cache.shape, version=24)
    batch, heads, seq, dim = update.shape
    slots = write_indices[:, None] + torch.arange(seq, device=update.device)
    return cache.scatter_(2, slots[:, None, :, None].expand(batch, heads, seq, dim), update)


class CohereAttention(nn.Module):
    def __init__(self, config: CohereConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        if config.use_qk_norm:
            self.q_norm = CohereLayerNorm((self.heads, self.head_dim), config.layer_norm_eps)
            self.k_norm = CohereLayerNorm((self.kv_heads, self.head_dim), config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, h, positions, mask, rope, k_cache, v_cache, write_indices):
        batch, seq, _ = h.shape
        attend = mask.shape[-1]
        q = self.q_proj(h).view(batch, seq, self.heads, self.head_dim)
        k = self.k_proj(h).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(h).view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:  # per-head norm, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = rotary_embedding(q.transpose(1, 2), cos, sin, positions)
        k = rotary_embedding(k.transpose(1, 2), cos, sin, positions)
        k_cache = kv_cache_update(k_cache, k, write_indices)  # keys are cached after RoPE
        v_cache = kv_cache_update(v_cache, v.transpose(1, 2), write_indices)
        out = F.scaled_dot_product_attention(q, k_cache[:, :, :attend], v_cache[:, :, :attend], attn_mask=mask,
                                             scale=self.head_dim ** -0.5, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), k_cache, v_cache


class CohereMLP(nn.Module):
    def __init__(self, config: CohereConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CohereDecoderLayer(nn.Module):
    """Parallel block: one shared norm feeds both attention and MLP; both add to the same residual."""

    def __init__(self, config: CohereConfig):
        super().__init__()
        self.input_layernorm = CohereLayerNorm((config.hidden_size,), config.layer_norm_eps)
        self.self_attn = CohereAttention(config)
        self.mlp = CohereMLP(config)

    def forward(self, x, positions, mask, rope, k_cache, v_cache, write_indices):
        h = self.input_layernorm(x)
        attn, k_cache, v_cache = self.self_attn(h, positions, mask, rope, k_cache, v_cache, write_indices)
        return x + attn + self.mlp(h), k_cache, v_cache


class CohereBackbone(nn.Module):
    def __init__(self, config: CohereConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CohereDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = CohereLayerNorm((config.hidden_size,), config.layer_norm_eps)


KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class CohereForCausalLM(nn.Module):
    """Parameter names equal HF's (``model.layers.0.self_attn.q_proj.weight``…), so a checkpoint maps 1:1."""

    def __init__(self, config: CohereConfig):
        super().__init__()
        self.config = config
        self.model = CohereBackbone(config)
        # Tied checkpoints have no lm_head tensor: the embedding is the output projection.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_caches(self, batch: int, max_context: int) -> KVCaches:
        """Zeroed static caches, one (key, value) pair per layer, ``[batch, kv_heads, max_context, head_dim]``."""
        c = self.config
        shape = (batch, c.num_key_value_heads, max_context, c.head_dim)
        device = self.model.embed_tokens.weight.device
        return [(torch.zeros(shape, dtype=self.dtype, device=device), torch.zeros(shape, dtype=self.dtype,
                                                                                  device=device))
                for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, write_indices: torch.Tensor | None = None,
                logits_indices: torch.Tensor | None = None, caches: KVCaches | None = None,
                kv_slots: torch.Tensor | None = None):
        """With only ``input_ids`` (no cache): fp32 logits ``[batch, seq, vocab]`` for every position, from a fresh
        cache. With ``caches``: ``(logits [batch, vocab] fp32 at logits_indices, caches)``, caches advanced."""
        batch, seq = input_ids.shape
        full_logits = caches is None
        if full_logits:
            caches = self.new_caches(batch, seq)
            write_indices = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
        max_context = caches[0][0].shape[2]

        offsets = torch.arange(seq, dtype=torch.int64, device=input_ids.device)
        positions = write_indices[:, None] + offsets[None, :]  # [batch, seq]
        if kv_slots is None:
            kv_slots = torch.arange(int((write_indices + seq).max()), dtype=torch.int64, device=input_ids.device)
        mask = (kv_slots[None, None, :] <= positions[:, :, None])[:, None]  # [batch, 1, seq, kv_slots]
        rope = rotary_tables(self.config, max_context)

        x = self.model.embed_tokens(input_ids)
        new_caches = []
        for layer, (k_cache, v_cache) in zip(self.model.layers, caches):
            x, k_cache, v_cache = layer(x, positions, mask, rope, k_cache, v_cache, write_indices)
            new_caches.append((k_cache, v_cache))

        if not full_logits:
            x = x[torch.arange(batch, device=x.device), logits_indices]  # [batch, hidden]
        logits = self.logits(self.model.norm(x))
        return logits if full_logits else (logits, new_caches)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.scaled_logits(h, weight)

    def scaled_logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``h`` against the output projection ``weight`` (or some of its vocabulary rows)."""
        # Cohere multiplies by logit_scale (Granite divides); forgetting it makes sampling near-deterministic.
        return F.linear(h, weight).float() * self.config.logit_scale

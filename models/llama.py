"""LLaMA-family decoder (llama, mistral, qwen2) in Flax NNX.

Attribute names follow Hugging Face, so a parameter's path in the NNX state is its HF name
(`model.layers.3.mlp.gate_proj.weight`), and weights are kept in HF layout `[out, in]`. Each layer
has its own MLP width, so a model pruned to different widths per layer runs as is.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax.models.config import LlamaConfig
from prunenet_jax.errors import UserError

_INIT_STD = 0.02


class Linear(nnx.Module):
    """y = x W^T (+ b) with W stored as HF's [out, in]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        w = _INIT_STD * jax.random.normal(rngs.params(), (out_features, in_features))
        self.weight = nnx.Param(w.astype(dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        w = _INIT_STD * jax.random.normal(rngs.params(), (vocab_size, hidden_size))
        self.weight = nnx.Param(w.astype(dtype))

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in fp32 as transformers does, then cast back before the scale.
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, with llama3 scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    if cfg.rope_scaling is None:
        return inv_freq.astype(np.float32)
    s = dict(cfg.rope_scaling)
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, cos, sin):
    """x: (B, T, N, D); cos/sin: (B, T, D). HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = Linear(H, self.num_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(H, self.num_kv_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(H, self.num_kv_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.num_heads * D, H, bias=cfg.o_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(B, T, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, hidden_size: int, width: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden_size, width, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, width, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(width, hidden_size, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, width: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.hidden_size, width, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, cfg.mlp_width(i), dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs))

    def __call__(self, tokens, attention_mask=None, positions=None):
        """Logits (B, T, V) in fp32. attention_mask: (B, T), 1 for real tokens, 0 for padding."""
        B, T = tokens.shape
        window = self.config.sliding_window
        if window is not None and T > window:
            raise UserError(f"input of {T} tokens exceeds the model's sliding window of {window}; "
                            f"use --seq_len <= {window}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(self.config)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return jnp.einsum("bth,vh->btv", x, head[...], preferred_element_type=jnp.float32)


def from_named_arrays(cfg: LlamaConfig, named: Iterable[tuple[str, np.ndarray]],
                      dtype=jnp.float32) -> LlamaForCausalLM:
    """Builds the model from (HF name, array) pairs without allocating a random init first."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    seen = set()
    for name, array in named:
        key = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        if key not in params:
            raise UserError(f"tensor {name!r} has no place in a {cfg.model_type} model of this "
                            "config; the checkpoint and its config.json disagree")
        var = params[key]
        if tuple(array.shape) != tuple(var.shape):
            raise UserError(f"tensor {name!r} has shape {tuple(array.shape)}, the config implies "
                            f"{tuple(var.shape)}; fix config.json or use matching weights")
        var.set_value(jnp.asarray(array, dtype=dtype))
        seen.add(key)
    missing = [".".join(map(str, k)) for k in params if k not in seen]
    if missing:
        raise UserError(f"tensors missing from the checkpoint: {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")
    return model

"""The decoder of every family (models/families.py: LLaMA, Mistral, Qwen2/3, OPT, Phi, Phi-3,
Falcon, GPT-NeoX, Gemma 2/3) in Flax NNX, each layer built from the config's norm, block, MLP and
position kinds. Layers of a sliding-window model take the windowed mask (and, in Gemma 3, the
local rope) or the full one per layer (`with_window`, `for_layer`).

Attribute names are the canonical names (models/registry.py; LLaMA's Hugging Face names), so a
parameter's path in the NNX state is its canonical name (`model.layers.3.mlp.gate_proj.weight`),
and weights are kept in HF layout `[out, in]`. When all
layers have the same MLP width they are stacked on a leading layer axis and the forward scans over
them (`model.layers.mlp.gate_proj.weight` is `(L, I, H)`, row i is HF's layer i), so compile time
does not grow with depth; a model pruned to different widths per layer keeps a list of layers and
runs unrolled. The same forward serves perplexity, KV-cache decoding (`KVCache`, see
models/decode.py) and the MLP channel statistics (`channel_stats`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax.models import activations, rope as rope_lib
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.errors import UserError

_INIT_STD = 0.02
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


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


class TiedHeadBias(nnx.Module):
    """The bias of an output head whose weight is the token embedding."""

    def __init__(self, size: int, dtype):
        self.bias = nnx.Param(jnp.zeros((size,), dtype))


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in fp32 as transformers does, then cast back before the scale.
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: x * (1 + w), the scale applied in fp32 before the cast (w starts at 0)."""

    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.zeros((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.bias = nnx.Param(jnp.zeros((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


_NORMS = {"rms": RMSNorm, "layer": LayerNorm, "gemma_rms": GemmaRMSNorm}


def norm(cfg: ModelConfig, size: int, dtype):
    """The family's norm: RMSNorm, LayerNorm with a bias, or Gemma's RMSNorm."""
    return _NORMS[cfg.norm](size, cfg.norm_eps, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, `(L, B, S, Kv, D)`; a call writes its T tokens at slots
    `[index, index + T)` of every row (rows are left-padded, so one index serves the batch)."""
    keys: jax.Array
    values: jax.Array
    index: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, size: int, dtype) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, size, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def write(self, layer, k, v):
        """Stores layer `layer`'s new keys/values; returns that layer's full buffers and the cache."""
        start = (layer, 0, self.index, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys, k[None].astype(self.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(self.values, v[None].astype(self.values.dtype), start)
        return keys[layer], values[layer], dataclasses.replace(self, keys=keys, values=values)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = Linear(H, self.num_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(H, self.num_kv_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(H, self.num_kv_heads * D, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.num_heads * D, H, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = norm(cfg, D, dtype) if cfg.qk_norm else None
        self.k_norm = norm(cfg, D, dtype) if cfg.qk_norm else None
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap  # Gemma's; None: 1/sqrt(D)

    def __call__(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer=0):
        """mask: (B or 1, T, S) over the S keys (S = T without a cache, the cache size with one)."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # rotary positions (learned ones were added to the embeddings)
            q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
        if cache is not None:
            k, v, cache = cache.write(layer, k, v)
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(B, T, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        if self.scale is None:
            scores = scores / math.sqrt(self.head_dim)
        else:
            scores = scores * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """Gated (act(gate x) * up x, LLaMA) or plain (act(fc1 x): fc1 is up_proj, fc2 down_proj)."""

    def __init__(self, cfg: ModelConfig, width: int, *, dtype, rngs: nnx.Rngs):
        H, bias = cfg.hidden_size, cfg.mlp_bias
        self.gate_proj = Linear(H, width, bias=bias, dtype=dtype, rngs=rngs) if cfg.gated else None
        self.up_proj = Linear(H, width, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(width, H, bias=bias, dtype=dtype, rngs=rngs)
        self.activation = cfg.activation

    def hidden(self, x):
        """The input of down_proj, one value per channel."""
        if self.gate_proj is None:
            return activations.apply(self.activation, self.up_proj(x))
        return activations.apply(self.activation, self.gate_proj(x)) * self.up_proj(x)

    def __call__(self, x):
        return self.down_proj(self.hidden(x))


def channel_moments(h, valid):
    """Per channel of h (B, T, I): the sum of h^2 and the peak |h| over the valid (B, T) tokens."""
    h = h.astype(jnp.float32)
    sum_sq = jnp.einsum("bti,bt->i", h * h, valid.astype(jnp.float32))
    peak = jnp.max(jnp.where(valid[..., None], jnp.abs(h), 0.0), axis=(0, 1))
    return sum_sq, peak


class DecoderLayer(nnx.Module):
    """One block: sequential pre-norm (LLaMA), parallel attention + MLP with one shared norm or
    two (Phi, Falcon, GPT-NeoX), or post-norm (OPT-350m). `attend` and `finish` are the parts
    before and after the MLP, so a caller can put its own MLP output in between (refit)."""

    def __init__(self, cfg: ModelConfig, width: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = norm(cfg, cfg.hidden_size, dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size, dtype) if cfg.mlp_norm else None
        self.mlp = MLP(cfg, width, dtype=dtype, rngs=rngs)
        self.parallel, self.post_norm = cfg.parallel, cfg.post_norm
        # Gemma's sandwich: a norm on each branch's output too, before its residual add.
        self.attn_output_layernorm = norm(cfg, cfg.hidden_size, dtype) if cfg.sandwich else None
        self.mlp_output_layernorm = norm(cfg, cfg.hidden_size, dtype) if cfg.sandwich else None

    def attend(self, x, cos, sin, mask, cache=None, layer=0):
        """(mid, mlp_in, cache): the residual stream after attention, and the MLP's input."""
        if self.post_norm:
            attn, cache = self.self_attn(x, cos, sin, mask, cache, layer)
            mid = self.input_layernorm(x + attn)
            return mid, mid, cache
        normed = self.input_layernorm(x)
        attn, cache = self.self_attn(normed, cos, sin, mask, cache, layer)
        if self.attn_output_layernorm is not None:
            attn = self.attn_output_layernorm(attn)
        mid = x + attn
        if self.post_attention_layernorm is None:  # parallel, one shared norm
            return mid, normed, cache
        return mid, self.post_attention_layernorm(x if self.parallel else mid), cache

    def finish(self, mid, mlp_out):
        """The layer's output from `attend`'s mid and the MLP's output."""
        if self.post_norm:
            return self.post_attention_layernorm(mid + mlp_out)
        if self.mlp_output_layernorm is not None:
            mlp_out = self.mlp_output_layernorm(mlp_out)
        return mid + mlp_out

    def __call__(self, x, cos, sin, mask, cache=None, layer=0, stats_mask=None):
        """(x, cache, channel moments of the MLP hidden, or None without stats_mask)."""
        mid, mlp_in, cache = self.attend(x, cos, sin, mask, cache, layer)
        h = self.mlp.hidden(mlp_in)
        stats = None if stats_mask is None else channel_moments(h, stats_mask)
        return self.finish(mid, self.mlp.down_proj(h)), cache, stats


def _stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading layer axis, for jax.lax.scan."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.state(layer) for layer in layers]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class LlamaModel(nnx.Module):
    """`layers` is one DecoderLayer with stacked (L, ...) parameters, scanned, when every layer has
    the same MLP width (compile time independent of depth); else a list, unrolled."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, scan: bool):
        H, E = cfg.hidden_size, cfg.embed_width
        self.embed_tokens = Embedding(cfg.vocab_size, E, dtype=dtype, rngs=rngs)
        self.embed_positions = (Embedding(cfg.max_position_embeddings + POSITION_OFFSET, H,
                                          dtype=dtype, rngs=rngs)
                                if cfg.positions == "learned" else None)
        projected = E != H
        self.project_in = Linear(E, H, bias=False, dtype=dtype, rngs=rngs) if projected else None
        self.project_out = Linear(H, E, bias=False, dtype=dtype, rngs=rngs) if projected else None
        layers = [DecoderLayer(cfg, cfg.mlp_width(i), dtype=dtype, rngs=rngs)
                  for i in range(cfg.num_hidden_layers)]
        self.layers = _stack_layers(layers) if scan else nnx.List(layers)
        self.norm = norm(cfg, H, dtype) if cfg.final_norm else None
        self.windowed = cfg.windowed()  # per layer: attends through the sliding window
        self.remat = False  # recompute each layer in the backward pass (training: less memory)

    def run_layers(self, x, cos, sin, mask, cache=None, stats_mask=None):
        """All decoder layers: (x, cache, stats). stats: (sum h^2, peak |h|), each (L, I) when
        scanned, else per-layer tuples; None without stats_mask."""
        windowed = self.windowed
        if isinstance(self.layers, nnx.List):
            stats = []
            for i, layer in enumerate(self.layers):
                w = windowed is not None and windowed[i]
                m, c, s_ = for_layer(mask, w), for_layer(cos, w), for_layer(sin, w)
                if self.remat:  # training: no cache, no statistics
                    x, s = nnx.remat(lambda layer, x: layer(x, c, s_, m)[0])(layer, x), None
                    continue
                x, cache, s = layer(x, c, s_, m, cache, i, stats_mask)
                stats.append(s)
            return x, cache, None if stats_mask is None else tuple(zip(*stats))
        graphdef, state = nnx.split(self.layers)
        depth = jax.tree.leaves(state)[0].shape[0]
        flags = jnp.asarray(windowed if windowed is not None else (False,) * depth)

        def body(carry, xs):
            x, cache = carry
            layer_state, i, flag = xs
            layer = nnx.merge(graphdef, layer_state)
            x, cache, s = layer(x, for_layer(cos, flag), for_layer(sin, flag),
                                for_layer(mask, flag), cache, i, stats_mask)
            return (x, cache), s

        if self.remat:
            body = jax.checkpoint(body)
        (x, cache), stats = jax.lax.scan(body, (x, cache), (state, jnp.arange(depth), flags))
        return x, cache, stats


def with_window(cfg: ModelConfig, mask, q_pos=None, k_pos=None):
    """The attention mask(s) a forward takes: `mask` (B or 1, T, S) as is for a model without a
    sliding window, else (mask, windowed mask) where a query also sees only the keys less than
    `sliding_window` positions behind it (q_pos (B or 1, T) and k_pos (B or 1, S); default: the
    slots 0..T-1 of a call without a cache), as transformers' sliding-window mask."""
    if cfg.sliding_window is None:
        return mask
    if q_pos is None:
        q_pos = k_pos = jnp.arange(mask.shape[-1])[None]
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
    return mask, mask & near


def for_layer(value, windowed):
    """One layer's share of a (full-attention, windowed) pair (`with_window`'s masks, Gemma's
    (global, local) rope): the second where `windowed` (a bool, or a traced one inside the scan
    over layers). A value that is not a pair serves every layer."""
    if not isinstance(value, tuple):
        return value
    full, near = value
    if isinstance(windowed, bool):
        return near if windowed else full
    return jnp.where(windowed, near, full)


def uniform_widths(cfg: ModelConfig) -> bool:
    """Whether every layer has the same MLP width, so the layers can be stacked and scanned."""
    return len({cfg.mlp_width(i) for i in range(cfg.num_hidden_layers)}) == 1


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None,
                 scan: Optional[bool] = None):
        """scan: stack and scan the layers (None: when the MLP widths are uniform; False unrolls)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        scan = uniform_widths(cfg) if scan is None else scan
        if scan and not uniform_widths(cfg):
            raise ValueError("layers of different MLP widths cannot be scanned")
        self.config = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs, scan=scan)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.embed_width, cfg.vocab_size, bias=cfg.lm_head_bias,
                                  dtype=dtype, rngs=rngs)
        else:  # the embedding is the head's weight; a bias (Phi's) stays its own
            self.lm_head = TiedHeadBias(cfg.vocab_size, dtype) if cfg.lm_head_bias else None

    def __call__(self, tokens, attention_mask=None, positions=None):
        """Logits (B, T, V) in fp32. attention_mask: (B, T), 1 for real tokens, 0 for padding."""
        B, T = tokens.shape
        table = self.config.max_position_embeddings
        if self.config.positions == "learned" and T > table:  # no position embedding past it
            raise UserError(f"input of {T} tokens exceeds the model's {table} learned positions "
                            f"(max_position_embeddings); use --seq_len <= {table}")
        if positions is None and attention_mask is not None and self.config.positions == "learned":
            # As OPT does: positions count the real tokens (rotary families count every slot).
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        x, _, _ = self.hidden_states(tokens, positions, with_window(self.config, mask))
        return self.logits(x)

    def hidden_states(self, tokens, positions, mask, cache: Optional[KVCache] = None, stats_mask=None):
        """The final hidden states (B, T, E) the head reads (normed, projected out where the
        model has those), the cache with this call's keys/values written, and (with stats_mask
        (B, T)) the MLP channel moments of `LlamaModel.run_layers`. mask: (B or 1, T, S), which
        keys each query sees; for a model with a sliding window, the pair (full, windowed) of
        `with_window`, each layer taking its own."""
        cos, sin = self.rope(positions)
        x = self.embed(tokens, positions)
        x, cache, stats = self.model.run_layers(x, cos, sin, mask, cache, stats_mask)
        return self.head_input(x), cache, stats

    def embed(self, tokens, positions):
        """The first layer's input: token embeddings (projected in), plus learned positions."""
        x = self.model.embed_tokens(tokens)
        if self.config.embed_scale:  # Gemma: sqrt(hidden), rounded to the weights' dtype first
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        if self.model.project_in is not None:
            x = self.model.project_in(x)
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(positions + POSITION_OFFSET)
        return x

    def head_input(self, x):
        if self.model.norm is not None:
            x = self.model.norm(x)
        return x if self.model.project_out is None else self.model.project_out(x)

    def rope(self, positions):
        """(cos, sin) of the rotary embedding at positions (B, T), each (B, T, rotary dims);
        (None, None) for a model with learned positions."""
        if self.config.rope is None:
            return None, None
        cos, sin = rope_lib.cos_sin(self.config.rope, positions)
        if self.config.rope_local is None:
            return cos, sin
        # Gemma: windowed layers rotate with their own base; `for_layer` picks each layer's.
        local_cos, local_sin = rope_lib.cos_sin(self.config.rope_local, positions)
        return (cos, local_cos), (sin, local_sin)

    def logits(self, x):
        tied = not isinstance(self.lm_head, Linear)
        head = self.model.embed_tokens.weight if tied else self.lm_head.weight
        logits = jnp.einsum("bth,vh->btv", x, head[...], preferred_element_type=jnp.float32)
        bias = None if self.lm_head is None else self.lm_head.bias
        if bias is not None:
            logits = logits + bias[...].astype(jnp.float32)
        cap = self.config.logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap


class ChannelStats(NamedTuple):
    """Per layer and FFN channel: sum of h_j^2 and peak |h_j| over `tokens` valid tokens (h: the
    input of down_proj). (L, I) arrays, or per-layer tuples for per-layer widths."""
    sum_sq: Any
    peak: Any
    tokens: Any

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        return ChannelStats(jax.tree.map(jnp.add, self.sum_sq, other.sum_sq),
                            jax.tree.map(jnp.maximum, self.peak, other.peak),
                            self.tokens + other.tokens)

    def mean_sq(self):
        """E[h_j^2] over the tokens seen."""
        return jax.tree.map(lambda s: s / self.tokens, self.sum_sq)


def padded_positions(valid):
    """(positions, attend) of rows (B, T) whose valid tokens (True) may be padded: positions count
    valid tokens (left padding starts at 0 too); attend (B, T, T) is causal over valid keys."""
    T = valid.shape[1]
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    return positions, jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]


@functools.partial(jax.jit, static_argnums=0)
def _channel_stats(graphdef, state, tokens, mask) -> ChannelStats:
    model = nnx.merge(graphdef, state)
    valid = mask.astype(bool)
    positions, attend = padded_positions(valid)
    attend = with_window(model.config, attend)
    _, _, (sum_sq, peak) = model.hidden_states(tokens, positions, attend, stats_mask=valid)
    return ChannelStats(sum_sq, peak, jnp.sum(valid, dtype=jnp.int32))


def channel_stats(model: CausalLM, tokens, mask=None) -> ChannelStats:
    """One jitted forward over tokens (B, T) (mask: 1 for real tokens) that returns only the MLP
    channel statistics of every layer: memory O(L * I) whatever the number of tokens, so a caller
    streams over batches with `ChannelStats.merge`. Compiled once per shape."""
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    graphdef, state = nnx.split(model)
    return _channel_stats(graphdef, state, jnp.asarray(tokens), mask)


def named_arrays(model: CausalLM) -> dict[str, jax.Array]:
    """Every parameter under its HF name (a scanned parameter as its (L, ...) stack under the
    layer suffix, e.g. `mlp.gate_proj.weight`; an unrolled one per layer, full name): the inverse
    of `from_named_arrays` for models without adapters."""
    out = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, key))
        if key[:2] == ("model", "layers") and not isinstance(key[2], int):
            name = ".".join(map(str, key[2:]))
        out[name] = var.get_value()
    return out


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def from_named_arrays(cfg: ModelConfig, named: Iterable[tuple[str, np.ndarray]],
                      dtype=jnp.float32, scan: Optional[bool] = None) -> CausalLM:
    """Builds the model from (HF name, array) pairs without allocating a random init first.
    In a scanned model, layer i's tensor is row i of the stacked parameter."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, scan=scan))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    scanned, L = not isinstance(model.model.layers, nnx.List), cfg.num_hidden_layers
    rows: dict[tuple, list] = {}  # stacked parameter -> its L layers' arrays
    for name, array in named:
        m = _LAYER_NAME.match(name) if scanned else None
        parts = (f"model.layers.{m.group(2)}" if m else name).split(".")
        key = tuple(int(p) if p.isdigit() else p for p in parts)
        layer = int(m.group(1)) if m else None
        if key not in params or (layer is not None and layer >= L):
            raise UserError(f"tensor {name!r} has no place in a {cfg.model_type} model of this "
                            "config; the checkpoint and its config.json disagree")
        var = params[key]
        want = var.shape[1:] if m else var.shape
        if tuple(array.shape) != tuple(want):
            raise UserError(f"tensor {name!r} has shape {tuple(array.shape)}, the config implies "
                            f"{tuple(want)}; fix config.json or use matching weights")
        if m:
            rows.setdefault(key, [None] * L)[layer] = array
        else:
            var.set_value(jnp.asarray(array, dtype=dtype))
            rows[key] = []
    missing = [".".join(map(str, k)) for k in params if k not in rows]
    missing += [f"model.layers.{i}.{'.'.join(map(str, k[2:]))}"
                for k, arrays in rows.items() for i, a in enumerate(arrays) if a is None]
    if missing:
        raise UserError(f"tensors missing from the checkpoint: {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")
    for key, arrays in rows.items():
        if arrays:  # one stacked host copy of one parameter at a time
            params[key].set_value(jnp.asarray(np.stack(arrays), dtype=dtype))
    return model

"""Supported architectures and where their weights live, in Hugging Face and GGUF names.

Everything that differs between `model_type`s is kept here, in one place. Our Flax modules use the
Hugging Face attribute names, so the HF name of a parameter is also its path in the Flax state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np

from prunenet_jax.errors import UserError

# Per-layer tensors, as suffixes of `model.layers.{i}.` in HF names (layout [out, in]).
Q, K, V, O = (f"self_attn.{p}_proj.weight" for p in "qkvo")
Q_BIAS, K_BIAS, V_BIAS, O_BIAS = (f"self_attn.{p}_proj.bias" for p in "qkvo")
GATE, UP, DOWN = (f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
GATE_BIAS, UP_BIAS, DOWN_BIAS = (f"mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
INPUT_NORM = "input_layernorm.weight"
POST_ATTN_NORM = "post_attention_layernorm.weight"

# Whole-model tensors.
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

LAYER_PREFIX = "model.layers.{}."

# llama.cpp's tensor names for the same tensors (GGUF files).
GGUF_GLOBAL = {EMBED: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight"}
GGUF_LAYER = {
    Q: "attn_q.weight", K: "attn_k.weight", V: "attn_v.weight", O: "attn_output.weight",
    Q_BIAS: "attn_q.bias", K_BIAS: "attn_k.bias", V_BIAS: "attn_v.bias", O_BIAS: "attn_output.bias",
    GATE: "ffn_gate.weight", UP: "ffn_up.weight", DOWN: "ffn_down.weight",
    INPUT_NORM: "attn_norm.weight", POST_ATTN_NORM: "ffn_norm.weight",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    # (qkv_bias, o_bias) from the HF config dict.
    attention_biases: Callable[[dict], tuple[bool, bool]]
    # Longest input the model is defined for without a sliding-window mask (None: no limit).
    sliding_window: Callable[[dict], Optional[int]] = lambda cfg: None
    # llama.cpp's converter permutes q/k rows for this GGUF architecture; we undo it on load.
    gguf_permutes_qk: bool = False
    gguf_arch: str = ""


def _llama_biases(cfg: dict) -> tuple[bool, bool]:
    b = bool(cfg.get("attention_bias", False))
    return b, b


def _mistral_window(cfg: dict) -> Optional[int]:
    w = cfg.get("sliding_window")
    return int(w) if w else None


def _qwen2_window(cfg: dict) -> Optional[int]:
    w = cfg.get("sliding_window")
    return int(w) if cfg.get("use_sliding_window") and w else None


ARCHITECTURES = {
    "llama": Architecture("llama", _llama_biases, gguf_permutes_qk=True, gguf_arch="llama"),
    "mistral": Architecture("mistral", lambda cfg: (False, False), _mistral_window,
                            gguf_permutes_qk=True, gguf_arch="llama"),
    "qwen2": Architecture("qwen2", lambda cfg: (True, False), _qwen2_window, gguf_arch="qwen2"),
}
SUPPORTED = tuple(sorted(ARCHITECTURES))


def get(model_type: Optional[str], source: str = "config.json") -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED)}. Use a checkpoint of one of these architectures"
        )
    return ARCHITECTURES[model_type]


def layer_tensor_names(cfg) -> list[str]:
    """Per-layer tensor suffixes a checkpoint of this config must contain."""
    names = [INPUT_NORM, POST_ATTN_NORM, Q, K, V, O, GATE, UP, DOWN]
    if cfg.qkv_bias:
        names += [Q_BIAS, K_BIAS, V_BIAS]
    if cfg.o_bias:
        names.append(O_BIAS)
    if cfg.mlp_bias:
        names += [GATE_BIAS, UP_BIAS, DOWN_BIAS]
    return names


def global_tensor_names(cfg) -> list[str]:
    return [EMBED, FINAL_NORM] + ([] if cfg.tie_word_embeddings else [LM_HEAD])


def expected_shapes(cfg) -> dict[str, tuple]:
    """Shape of every tensor: global names as is, layer names as stacked (L, ...) arrays."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = {
        INPUT_NORM: (H,), POST_ATTN_NORM: (H,),
        Q: (q, H), K: (kv, H), V: (kv, H), O: (H, q),
        Q_BIAS: (q,), K_BIAS: (kv,), V_BIAS: (kv,), O_BIAS: (H,),
        GATE: (I, H), UP: (I, H), DOWN: (H, I),
        GATE_BIAS: (I,), UP_BIAS: (I,), DOWN_BIAS: (H,),
    }
    shapes = {EMBED: (cfg.vocab_size, H), FINAL_NORM: (H,), LM_HEAD: (cfg.vocab_size, H)}
    shapes.update({n: (L,) + per_layer[n] for n in layer_tensor_names(cfg)})
    return {n: shapes[n] for n in global_tensor_names(cfg) + layer_tensor_names(cfg)}


# ----------------------------------------------------------------------------- GGUF transforms

def gguf_transforms(cfg) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per-layer HF name -> what turns the GGUF tensor (numpy, HF layout) into the HF one: the
    q/k row un-permutation for architectures whose llama.cpp converter permutes them."""
    if not ARCHITECTURES[cfg.model_type].gguf_permutes_qk:
        return {}
    heads = {Q: cfg.num_attention_heads, Q_BIAS: cfg.num_attention_heads,
             K: cfg.num_key_value_heads, K_BIAS: cfg.num_key_value_heads}
    return {name: functools.partial(unpermute_qk, n_head=n) for name, n in heads.items()}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (rows = n_head * head_dim, weights or biases).

    The converter reorders each head's rows from rotate-half order (HF: first the real halves,
    then the imaginary ones) to interleaved pairs (ggml's RoPE): rows (h, c, j) -> (h, j, c) with
    c in {0, 1} and j < head_dim / 2. We map them back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF -> GGUF); the inverse of `unpermute_qk`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

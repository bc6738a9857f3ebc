"""Fused query/key/value tensors (Falcon, GPT-NeoX): split on read, fused on write.

Both families store their fused rows as (kv_heads, group + 2, head_dim) blocks, group = heads /
kv_heads: each key/value head follows the query heads that share it. Falcon's three layouts are
this one (new architecture: kv_heads groups; multi-query: kv_heads = 1; neither: kv_heads =
heads, so (heads, 3, head_dim)), and so is GPT-NeoX's per-head [q | k | v] (kv_heads = heads).
Works on weights (rows, in) and biases (rows,) alike.
"""
from __future__ import annotations

import numpy as np


def split(fused: np.ndarray, heads: int, kv_heads: int, head_dim: int):
    """(q, k, v) of a fused tensor: rows heads*D, kv_heads*D, kv_heads*D."""
    group = heads // kv_heads
    blocks = fused.reshape(kv_heads, group + 2, head_dim, *fused.shape[1:])
    rest = fused.shape[1:]
    q = blocks[:, :group].reshape(heads * head_dim, *rest)
    k = blocks[:, group].reshape(kv_heads * head_dim, *rest)
    v = blocks[:, group + 1].reshape(kv_heads * head_dim, *rest)
    return q, k, v


def fuse(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, kv_heads: int,
         head_dim: int) -> np.ndarray:
    """The inverse of `split`."""
    group, rest = heads // kv_heads, q.shape[1:]
    blocks = np.concatenate([q.reshape(kv_heads, group, head_dim, *rest),
                             k.reshape(kv_heads, 1, head_dim, *rest),
                             v.reshape(kv_heads, 1, head_dim, *rest)], axis=1)
    return blocks.reshape((heads + 2 * kv_heads) * head_dim, *rest)

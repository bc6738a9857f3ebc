"""Fused tensors: split on read, fused on write. Works on weights (rows, in) and biases (rows,).

q/k/v, in one of two row layouts:
- "grouped" (Falcon, GPT-NeoX): (kv_heads, group + 2, head_dim) blocks, group = heads / kv_heads:
  each key/value head follows the query heads that share it. Falcon's three layouts are this one
  (new architecture: kv_heads groups; multi-query: kv_heads = 1; neither: kv_heads = heads, so
  (heads, 3, head_dim)), and so is GPT-NeoX's per-head [q | k | v] (kv_heads = heads).
- "concat" (Phi-3 `qkv_proj`): [all q | all k | all v].

gate/up (Phi-3 `gate_up_proj`): [gate | up], halves of the rows.
"""
from __future__ import annotations

import numpy as np


def split(fused: np.ndarray, heads: int, kv_heads: int, head_dim: int, layout: str = "grouped"):
    """(q, k, v) of a fused tensor: rows heads*D, kv_heads*D, kv_heads*D."""
    rest = fused.shape[1:]
    if layout == "concat":
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        return fused[:q_rows], fused[q_rows:q_rows + kv_rows], fused[q_rows + kv_rows:]
    group = heads // kv_heads
    blocks = fused.reshape(kv_heads, group + 2, head_dim, *rest)
    q = blocks[:, :group].reshape(heads * head_dim, *rest)
    k = blocks[:, group].reshape(kv_heads * head_dim, *rest)
    v = blocks[:, group + 1].reshape(kv_heads * head_dim, *rest)
    return q, k, v


def fuse(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, kv_heads: int,
         head_dim: int, layout: str = "grouped") -> np.ndarray:
    """The inverse of `split`."""
    if layout == "concat":
        return np.concatenate([q, k, v], axis=0)
    group, rest = heads // kv_heads, q.shape[1:]
    blocks = np.concatenate([q.reshape(kv_heads, group, head_dim, *rest),
                             k.reshape(kv_heads, 1, head_dim, *rest),
                             v.reshape(kv_heads, 1, head_dim, *rest)], axis=1)
    return blocks.reshape((heads + 2 * kv_heads) * head_dim, *rest)


def split_gate_up(fused: np.ndarray):
    """(gate, up): the first and second half of the rows."""
    half = fused.shape[0] // 2
    return fused[:half], fused[half:]


def fuse_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.concatenate([gate, up], axis=0)

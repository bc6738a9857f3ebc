"""Canonical tensor names (models/registry.py) to and from a family's Hugging Face names, with
fused tensors (q/k/v, Phi-3's gate/up) split on read and fused on write (models/fused_qkv.py)."""
from __future__ import annotations

import re
from typing import Iterator, Optional

import numpy as np

from prunenet_jax.models import families, fused_qkv, registry
from prunenet_jax.models.config import ModelConfig

# Canonical tensors held in a fused tensor: which fused kind, and their part of it.
_PARTS = {registry.Q: ("qkv", 0), registry.K: ("qkv", 1), registry.V: ("qkv", 2),
          registry.Q_BIAS: ("qkv", 0), registry.K_BIAS: ("qkv", 1), registry.V_BIAS: ("qkv", 2),
          registry.GATE: ("gate_up", 0), registry.UP: ("gate_up", 1),
          registry.GATE_BIAS: ("gate_up", 0), registry.UP_BIAS: ("gate_up", 1)}
_COUNT = {"qkv": 3, "gate_up": 2}


def layer_source(cfg: ModelConfig, suffix: str) -> tuple[str, Optional[tuple]]:
    """The HF layer suffix canonical `suffix` is stored under, and its (kind, part) of a fused
    tensor (kind "qkv": 0 q, 1 k, 2 v; "gate_up": 0 gate, 1 up), or None when stored whole."""
    family = families.family_of(cfg.model_type)
    kind, _ = _PARTS.get(suffix, (None, None))
    stem = {"qkv": family.fused_qkv, "gate_up": family.fused_gate_up}.get(kind)
    if stem:
        return f"{stem}.{suffix.rsplit('.', 1)[1]}", _PARTS[suffix]
    return family.hf_layer_name(cfg, suffix), None


def split_part(cfg: ModelConfig, fused: np.ndarray, part: tuple) -> np.ndarray:
    kind, index = part
    if kind == "gate_up":
        return fused_qkv.split_gate_up(fused)[index]
    layout = families.family_of(cfg.model_type).qkv_layout
    return fused_qkv.split(fused, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                           layout)[index]


def _fuse(cfg: ModelConfig, kind: str, parts: list) -> np.ndarray:
    if kind == "gate_up":
        return fused_qkv.fuse_gate_up(*parts)
    layout = families.family_of(cfg.model_type).qkv_layout
    return fused_qkv.fuse(*parts, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          layout)


def fused_shape(cfg: ModelConfig, suffix: str) -> tuple:
    """The HF shape of the fused tensor that holds canonical `suffix`."""
    kind, _ = _PARTS[suffix]
    if kind == "gate_up":
        rows = 2 * cfg.intermediate_size
    else:
        rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return (rows, cfg.hidden_size) if suffix.endswith(".weight") else (rows,)


def global_name(cfg: ModelConfig, name: str) -> str:
    return families.family_of(cfg.model_type).hf_global_name(name)


def layer_pattern(cfg: ModelConfig) -> re.Pattern:
    """Matches an HF per-layer name; group 1 is the layer index, group 2 the suffix."""
    prefix = families.family_of(cfg.model_type).layer_prefix
    return re.compile("^" + re.escape(prefix).replace(re.escape("{}"), r"(\d+)") + "(.+)$")


def hf_named_arrays(cfg: ModelConfig, globals_: dict, layers: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of every tensor: globals first, then layer by layer; a fused q/k/v is
    built per layer (one small copy), everything else is a view."""
    family = families.family_of(cfg.model_type)
    for name, array in globals_.items():
        yield global_name(cfg, name), array
    L = next(iter(layers.values())).shape[0] if layers else 0
    for i in range(L):
        prefix = family.layer_prefix.format(i)
        fused: dict[str, list] = {}
        for suffix, stacked in layers.items():
            hf_suffix, part = layer_source(cfg, suffix)
            if part is None:
                yield prefix + hf_suffix, stacked[i]
                continue
            kind, index = part
            fused.setdefault(hf_suffix, [None] * _COUNT[kind])[index] = stacked[i]
            if all(p is not None for p in fused[hf_suffix]):
                yield prefix + hf_suffix, _fuse(cfg, kind, fused.pop(hf_suffix))

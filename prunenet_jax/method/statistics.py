"""Per-channel MLP statistics over calibration tokens, streamed: E[h_j^2] and the peak |h_j| of every
layer's down_proj input h, from the model's one jitted statistics forward (`decoder.channel_stats`)
run batch by batch and merged (`ChannelStats.merge`), so memory is O(L * I) whatever the number of
tokens. With a mesh, the model's stacked layers are split over its layer axis (as the policy's
layer axis is in training), so each device holds only its layers' weights."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.method import sharding
from prunenet_jax.models import decoder


@dataclasses.dataclass(frozen=True)
class Stats:
    mean_sq: np.ndarray  # (L, I) E[h_j^2]
    peak: np.ndarray  # (L, I) max |h_j|
    tokens: int  # tokens seen


def shard_layers(model: decoder.CausalLM, mesh) -> decoder.CausalLM:
    """The model with its stacked (scanned) layer parameters split over the mesh's layer axis and
    everything else replicated; unchanged when the layers are not stacked or the mesh size does
    not divide their number (padding layers is not free for a forward pass)."""
    L = model.config.num_hidden_layers
    if mesh is None or isinstance(model.model.layers, nnx.List) or L % sharding.mesh_size(mesh):
        return model
    graphdef, state = nnx.split(model)
    layers = nnx.state(model.model.layers)
    placed_layers = jax.device_put(layers, sharding.layer_sharding(mesh))
    state = jax.device_put(state, sharding.replicated(mesh))
    model = nnx.merge(graphdef, state)
    nnx.update(model.model.layers, placed_layers)
    return model


def collect(model: decoder.CausalLM, tokens: np.ndarray, batch_size: int = 8,
            mask: Optional[np.ndarray] = None, mesh=None) -> Stats:
    """Statistics of `model` over tokens (N, T) (mask: 1 for real tokens), batch_size rows per
    forward; the last batch is padded with masked rows so one shape compiles once."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask, np.int32)
    model = shard_layers(model, mesh)
    total = None
    for start in progress.over(range(0, len(tokens), batch_size), "energy statistics", "batch"):
        t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        if len(t) < batch_size and start > 0:
            pad = ((0, batch_size - len(t)), (0, 0))
            t, m = np.pad(t, pad), np.pad(m, pad)
        s = decoder.channel_stats(model, t, m)
        total = s if total is None else total.merge(s)
    stack = lambda x: np.stack(x) if isinstance(x, (tuple, list)) else np.asarray(x)
    return Stats(stack(total.mean_sq()), stack(total.peak), int(total.tokens))

"""Rows of tokens walked through a decoder one layer at a time, so a caller can change each layer's
MLP output before the next layer sees it (the refit and compensated selection do: layer l is
fitted on the inputs the already-changed layers before it produce).

A walk holds, per batch of rows, the hidden states x entering the current layer and what every
layer needs beside them (rope, attention mask, valid tokens); `inputs` gives them for layer l
(a sliding-window layer gets its own mask and rope)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax.models import decoder


def layer_at(model: decoder.CausalLM, l: int):
    """(graphdef, state) of decoder layer l, whether the layers are stacked (scanned) or a list."""
    layers = model.model.layers
    if isinstance(layers, nnx.List):
        return nnx.split(layers[l])
    graphdef, state = nnx.split(layers)
    return graphdef, jax.tree.map(lambda a: a[l], state)


class LayerWalk:
    """The embedded rows of tokens (N, T) (mask 1 for real tokens) in batches of `batch_size`;
    `batches[b]` = [x, cos, sin, attend, valid], x replaced by the caller after each layer."""

    def __init__(self, model: decoder.CausalLM, tokens: np.ndarray, mask: np.ndarray,
                 batch_size: int = 8):
        self.config = model.config
        self.batches = []
        for start in range(0, len(tokens), batch_size):
            t = jnp.asarray(tokens[start:start + batch_size])
            valid = jnp.asarray(mask[start:start + batch_size]).astype(bool)
            positions, attend = decoder.padded_positions(valid)
            attend = decoder.with_window(self.config, attend)
            cos, sin = model.rope(positions)
            self.batches.append([model.embed(t, positions), cos, sin, attend, valid])

    def inputs(self, l: int):
        """Per batch (x, cos, sin, attend, valid) as layer l takes them."""
        windowed = self.config.windowed() is not None and self.config.windowed()[l]
        for x, cos, sin, attend, valid in self.batches:
            yield (x, decoder.for_layer(cos, windowed), decoder.for_layer(sin, windowed),
                   decoder.for_layer(attend, windowed), valid)

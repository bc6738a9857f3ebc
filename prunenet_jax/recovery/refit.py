"""Closed-form recovery: every layer's down_proj refit by ridge least squares so that the pruned
MLP reproduces the dense MLP on the recovery text (sampled by the dense model itself unless
--train_text is given). No gradient step; the result is a plain model of the pruned shape (only
down_proj changes), which fine-tuning then starts from.

Layers are refit in order, each on the inputs the already-refit layers before it produce: for
layer l, with x its MLP input on that path, h the kept channels at x and y the dense layer's
whole MLP at x, G = sum h h^T and B = sum h y^T over the valid tokens give
W^T = (G + ridge * mean(diag G) * I)^-1 B. With a down_proj bias, h gains a constant 1 (its
coefficient, unpenalised, is the bias). Measured on the default model at 20% (energy selection):
this removed 34% of the excess perplexity; fitting on the dense path's inputs instead removed 30%,
and also asking each layer to undo the drift upstream (target: the dense model's layer output)
only 13% (README, "Recovery").

Memory: both models in fp32 on the default device, the hidden states of every row (rows x T x H,
plus one layer's kept channels) and one (k x k) system; the solve runs in float64 on the host
(k^3 per layer).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.models import decoder, layer_walk, registry
from prunenet_jax.weights import ModelWeights

RIDGE = 1e-4  # relative to the mean diagonal of G: keeps rarely active channels' weights bounded


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _layer_system(dense_def, pruned_def, bias: bool, dense_state, pruned_state, x, cos, sin, attend,
                  valid):
    """One batch through layer l on the refit path x: the residual after attention, the kept
    channels h (with a constant 1 when fitting a bias), and the sums G = h^T h, B = h^T y, |y|^2
    of the fit, whose target y is the dense layer's whole MLP at the same input."""
    dense_layer, pruned_layer = nnx.merge(dense_def, dense_state), nnx.merge(pruned_def, pruned_state)
    mid, normed, _ = pruned_layer.attend(x, cos, sin, attend)
    h = pruned_layer.mlp.hidden(normed).astype(jnp.float32)
    if bias:
        h = jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)
    y = dense_layer.mlp(normed).astype(jnp.float32)  # attention and norms are the dense model's
    w = valid[..., None].astype(jnp.float32)
    sums = (jnp.einsum("bti,btj->ij", h * w, h), jnp.einsum("bti,bto->io", h * w, y),
            jnp.sum(w * y * y))
    return mid, h, sums


@functools.partial(jax.jit, static_argnums=0)
def _apply(layer_def, layer_state, mid, h, coef):
    """The refit layer's output: the kept channels through the new down_proj, added to the
    residual (and normed, in a post-norm layer)."""
    layer = nnx.merge(layer_def, layer_state)
    return layer.finish(mid, jnp.einsum("bti,io->bto", h, coef).astype(mid.dtype))


def _solve(G: np.ndarray, B: np.ndarray, bias: bool, ridge: float) -> np.ndarray:
    k = G.shape[0] - int(bias)
    reg = ridge * max(float(np.mean(np.diag(G)[:k])), 1e-12)
    penalty = np.r_[np.full(k, reg), np.zeros(int(bias))]
    return scipy.linalg.solve(G + np.diag(penalty), B, assume_a="pos")


def _residual(G, B, yy, coef) -> float:
    """sum |y - coef^T h|^2 from the sums (the fit's squared error over the tokens)."""
    return float(yy - 2 * np.sum(coef * B) + np.sum(coef * (G @ coef)))


def refit_down(pruned: ModelWeights, dense_model: decoder.CausalLM, tokens: np.ndarray,
               mask: np.ndarray, batch_size: int = 8, ridge: float = RIDGE
               ) -> tuple[ModelWeights, dict]:
    """`pruned` with every layer's down_proj (and its bias, if any) refit to `dense_model` (its
    source, fp32) on tokens (N, T) (mask 1 for real tokens), and what the manifest records:
    tokens used, seconds, and per layer the relative squared error |y - W h|^2 / |y|^2 of the
    pruned and of the refit down_proj."""
    started = time.time()
    cfg = pruned.config
    bias = registry.DOWN_BIAS in pruned.layers  # the column-sliced matrix's bias
    pruned_model = decoder.from_named_arrays(cfg, pruned.named_arrays())
    walk = layer_walk.LayerWalk(dense_model, tokens, mask, batch_size)  # the refit path
    down = np.array(pruned.layers[registry.COLUMN_SLICED], copy=True)  # (L, H, k)
    down_bias = np.array(pruned.layers[registry.DOWN_BIAS], copy=True) if bias else None
    before, after = [], []
    for l in progress.over(range(cfg.num_hidden_layers), "refit", "layer"):
        dense_def, dense_state = layer_walk.layer_at(dense_model, l)
        pruned_def, pruned_state = layer_walk.layer_at(pruned_model, l)
        G = B = 0.0
        yy, outs = 0.0, []
        for x, cos, sin, attend, valid in walk.inputs(l):
            mid, h, (g, bb, y2) = _layer_system(dense_def, pruned_def, bias, dense_state,
                                                pruned_state, x, cos, sin, attend, valid)
            G, B, yy = G + np.asarray(g, np.float64), B + np.asarray(bb, np.float64), yy + float(y2)
            outs.append((mid, h))
        coef = _solve(G, B, bias, ridge)  # (k [+1], H)
        old = down[l].T.astype(np.float64)
        if bias:
            old = np.vstack([old, down_bias[l][None].astype(np.float64)])
        scale = max(yy, 1e-30)
        before.append(_residual(G, B, yy, old) / scale)
        after.append(_residual(G, B, yy, coef) / scale)
        k = down.shape[2]
        down[l] = coef[:k].T.astype(down.dtype)
        if bias:
            down_bias[l] = coef[k].astype(down_bias.dtype)
        coef_device = jnp.asarray(coef, jnp.float32)
        for b, (mid, h) in zip(walk.batches, outs):
            b[0] = _apply(pruned_def, pruned_state, mid, h, coef_device)
    layers = {**pruned.layers, registry.COLUMN_SLICED: down}
    if bias:
        layers[registry.DOWN_BIAS] = down_bias
    info = {"tokens": int(np.sum(mask)), "rows": int(len(tokens)),
            "seconds": round(time.time() - started, 2),
            "layer_error_before": [round(e, 6) for e in before],
            "layer_error_after": [round(e, 6) for e in after]}
    return dataclasses.replace(pruned, layers=layers), info


def harm(info: dict, ppl_before: Optional[float], ppl_refit: Optional[float]) -> Optional[str]:
    """What the refit (`refit_down`'s info) made worse, in words, or None when nothing: by
    perplexity when it was measured before and after the refit, else by each layer's fit error
    on the rows it fit (which least squares lowers, unless the ridge or the rows are off)."""
    if ppl_before is not None and ppl_refit is not None:
        if math.isfinite(ppl_before) and not ppl_refit <= ppl_before:
            return f"the refit raised perplexity from {ppl_before:.3f} to {ppl_refit:.3f}"
        return None
    rose = [l for l, (b, a) in enumerate(zip(info["layer_error_before"], info["layer_error_after"]))
            if not a <= b]
    if not rose:
        return None
    shown = ", ".join(f"{l} ({info['layer_error_before'][l]:.4f} -> {info['layer_error_after'][l]:.4f})"
                      for l in rose[:4])
    return (f"the refit raised the relative fit error of layer{'s' * (len(rose) > 1)} {shown}"
            + (f" and {len(rose) - 4} more" if len(rose) > 4 else ""))

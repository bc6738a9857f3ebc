"""Compensation-aware selection (issue 26): per layer, the channels to drop and the re-fitted kept
down_proj columns, chosen together from the second moment of the down_proj input over the
calibration tokens (method/compensation.py's math), with the damping chosen on held-out rows.

Layers are walked in order (models/layer_walk.py): layer l's statistics are measured on the inputs
that the already-pruned and compensated layers before it produce, as the refit does (measured
there: fitting on the pruned path repairs more than on the dense path).

Per layer, the calibration rows are split into fit rows and held-out rows. Each candidate is
fitted on the fit rows' second moment G and scored by its error E||down h - V h_kept||^2 on the
held-out rows' second moment:
  - greedy structured OBS on G + d I, for each damping d in `dampings` (relative to the mean
    diagonal of G). The damping shrinks the re-fitted columns toward the original ones:
    V = (down G[:, S] + d down[:, S]) (G[S, S] + d I)^-1; large d is no compensation;
  - the `energy` channels (E[h_j^2] ||down[:, j]||^2) with each damping, and without any re-fit.
The best candidate's channels are kept; its columns are fitted again on all rows.

Cost per layer: the walk's forward, one I x I moment per row split, and per damping one greedy
removal (O(removed x I x (H + I))) and solve (O(I^3)); host float64.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.method import compensation
from prunenet_jax.models import decoder, layer_walk, registry
from prunenet_jax.weights import ModelWeights

DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)  # relative to mean(diag G)
HELD_OUT_EVERY = 4  # every 4th calibration row is held out to choose among the candidates
GREEDY_STEPS = 32  # block downdates per layer's greedy removal (compensation.greedy_removal)


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # "obs" or "energy"
    damping: Optional[float]  # None: the original columns, no re-fit
    kept: np.ndarray  # sorted channel indices
    held_out_error: float  # E||down h - V h_kept||^2 / E||down h||^2 on the held-out rows


@functools.partial(jax.jit, static_argnums=0)
def _moments(layer_def, layer_state, x, cos, sin, attend, valid, held_out):
    """One batch through layer l's attention: the residual, the MLP hidden h (I channels) and the
    sums of h h^T over the fit rows' and the held-out rows' valid tokens."""
    layer = nnx.merge(layer_def, layer_state)
    mid, normed, _ = layer.attend(x, cos, sin, attend)
    h = layer.mlp.hidden(normed).astype(jnp.float32)
    fit = (valid & ~held_out[:, None]).astype(jnp.float32)[..., None]
    out = (valid & held_out[:, None]).astype(jnp.float32)[..., None]
    return mid, h, jnp.einsum("bti,btj->ij", h * fit, h), jnp.einsum("bti,btj->ij", h * out, h)


@functools.partial(jax.jit, static_argnums=0)
def _finish(layer_def, layer_state, mid, h, kept, columns):
    """The pruned layer's output: the kept channels through the re-fitted columns (H x k)."""
    layer = nnx.merge(layer_def, layer_state)
    y = jnp.einsum("btk,hk->bth", h[..., kept], columns)
    if layer.mlp.down_proj.bias is not None:
        y = y + layer.mlp.down_proj.bias[...]
    return layer.finish(mid, y.astype(mid.dtype))


def _damped(G: np.ndarray, relative: float) -> np.ndarray:
    return G + compensation.ridge_of(G, relative) * np.eye(len(G))


def candidates(G_fit: np.ndarray, G_held: np.ndarray, down: np.ndarray, num_remove: int,
               dampings=DAMPINGS, steps: int = GREEDY_STEPS,
               guard: Optional[np.ndarray] = None) -> list[Candidate]:
    """Every candidate of one layer, scored on the held-out rows (module docstring); `guard`
    (I bool): channels every candidate keeps (as far as the width allows)."""
    down = np.asarray(down, np.float64)
    scale = max(float(np.sum((down @ G_held) * down)), 1e-30)
    energy = np.diag(G_fit + G_held) * np.einsum("hi,hi->i", down, down)
    if guard is not None:
        energy = np.where(guard, np.inf, energy)
    energy_kept = np.sort(np.argsort(-energy, kind="stable")[:len(energy) - num_remove])
    out = [Candidate("energy", None, energy_kept,
                     compensation.compensated_loss(G_held, down, energy_kept,
                                                   down[:, energy_kept]) / scale)]
    for d in dampings:
        damped = _damped(G_fit, d)
        _, kept, V = compensation.greedy_removal(damped, down, num_remove,
                                                 block=max(1, -(-num_remove // steps)),
                                                 protected=guard)
        out.append(Candidate("obs", d, kept,
                             compensation.compensated_loss(G_held, down, kept, V) / scale))
        V = compensation.compensated_down(damped, down, energy_kept)
        out.append(Candidate("energy", d, energy_kept,
                             compensation.compensated_loss(G_held, down, energy_kept, V) / scale))
    return out


def select(weights: ModelWeights, tokens: np.ndarray, num_kept: int, *,
           mask: Optional[np.ndarray] = None, guard: Optional[np.ndarray] = None,
           dampings=DAMPINGS, steps: int = GREEDY_STEPS, batch_size: int = 8
           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(kept (L, k) sorted, their down_proj columns (L, H, k), what the manifest records) for
    `weights` pruned to `num_kept` channels per layer, from calibration tokens (N, T) (mask 1 for
    real tokens; at least 2 rows: every `HELD_OUT_EVERY`-th is held out, and at least one).
    `guard` (L, I) bool: channels kept first."""
    started = time.time()
    cfg = weights.config
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask, np.int32)
    if len(tokens) < 2:
        raise ValueError("compensated selection needs at least 2 calibration rows")
    held_out = np.arange(len(tokens)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    held_out[-1] |= not held_out.any()
    model = decoder.from_named_arrays(cfg, weights.named_arrays())
    walk = layer_walk.LayerWalk(model, tokens, mask, batch_size)
    held_batches = [jnp.asarray(held_out[s:s + batch_size]) for s in range(0, len(tokens), batch_size)]
    down = np.asarray(weights.layers[registry.COLUMN_SLICED])  # (L, H, I)
    num_remove = cfg.intermediate_size - num_kept
    kept_all, columns_all, chosen = [], [], []
    for l in progress.over(range(cfg.num_hidden_layers), "compensated selection", "layer"):
        layer_def, layer_state = layer_walk.layer_at(model, l)
        G_fit = G_held = 0.0
        outs = []
        for (x, cos, sin, attend, valid), held in zip(walk.inputs(l), held_batches):
            mid, h, g_fit, g_held = _moments(layer_def, layer_state, x, cos, sin, attend, valid, held)
            G_fit = G_fit + np.asarray(g_fit, np.float64)
            G_held = G_held + np.asarray(g_held, np.float64)
            outs.append((mid, h))
        best = min(candidates(G_fit, G_held, down[l], num_remove, dampings, steps,
                              None if guard is None else np.asarray(guard[l], bool)),
                   key=lambda c: c.held_out_error)
        if best.damping is None:
            columns = np.asarray(down[l][:, best.kept], np.float64)
        else:
            columns = compensation.compensated_down(_damped(G_fit + G_held, best.damping),
                                                    down[l], best.kept)
        kept_all.append(best.kept)
        columns_all.append(columns.astype(down.dtype))
        chosen.append({"candidate": best.name, "damping": best.damping,
                       "held_out_error": round(best.held_out_error, 6)})
        kept_device, columns_device = jnp.asarray(best.kept), jnp.asarray(columns, jnp.float32)
        for b, (mid, h) in zip(walk.batches, outs):
            b[0] = _finish(layer_def, layer_state, mid, h, kept_device, columns_device)
    info = {"rows": int(len(tokens)), "held_out_rows": int(held_out.sum()),
            "tokens": int(mask.sum()), "seconds": round(time.time() - started, 2), "layers": chosen}
    return np.stack(kept_all), np.stack(columns_all), info


"""Pruning a model: select the kept channels of every layer (`select_kept`: from the policy and
the seed's SELECTION stream, or from channel scores), then slice them (`slice_weights`: rows S of
the row-sliced tensors (gate/up or fc1, and their biases), columns S of down/fc2; registry.py's
roles).

Modes: `sample`, `topk` (PruneNet's policy), `random` (uniform, a baseline) and `energy` (the k
largest scores E[h_j^2] * ||down[:, j]||^2, method/scores.py). `compensated` also changes the kept
down_proj columns; method/compensated.py selects it and run/prune_run.Selection applies it. A guard (L, I) bool mask, when
given, is always kept; the other channels are chosen as the mode says among the unguarded ones
(the guarded get an infinite selection key, so they come first in every top-k)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from prunenet_jax import progress, rng
from prunenet_jax.errors import UserError
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import sampling
from prunenet_jax.models import families, registry
from prunenet_jax.weights import ModelWeights


MODES = ("sample", "topk", "random", "energy", "compensated")
POLICY_MODES = ("sample", "topk")  # the modes that need a trained policy
# the modes that need channel scores (forward passes over calibration tokens); `compensated`
# uses the tokens again, layer by layer (method/compensated.py), and the scores' guard
SCORE_MODES = ("energy", "compensated")


def parse_modes(spec: str) -> tuple[str, ...]:
    """--mode: one mode or a comma list, each once, in the order given."""
    modes = tuple(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise UserError(f"--mode={spec}: {'unknown mode ' + ', '.join(unknown) if unknown else 'empty'}"
                        f"; use one or more of {', '.join(MODES)} (comma-separated)")
    return modes


def warn_if_sample_alone(modes) -> bool:
    """One warning line when `sample` (the default) is the run's only mode: on real weights its
    policy measured no better than random channels, and `energy` far better (docs/modes.md)."""
    if tuple(modes) != ("sample",):
        return False
    progress.warning("--mode=sample alone: PruneNet's policy measured no better than slicing random "
                     "channels on real weights, --mode=energy far better; pass --mode=energy, or "
                     "--mode=sample,energy to compare them (the table in README.md and "
                     "docs/modes.md, \"Which mode to use\")")
    return True


def select_kept(params: Optional[dict], gate, ratio: float, mode: str, seed: int, *,
                guard: Optional[np.ndarray] = None, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Kept channels (L, k) at `ratio` for the scored matrices (L, I, H) (host or device). The key
    depends on the seed and k only (stream rng.SELECTION), so one seed gives the same channels
    whatever else the run does. `guard`: (L, I) channels always kept; `scores`: (L, I) of `energy`."""
    k = sampling.num_kept(gate.shape[1], ratio)
    return select_channels(params, gate, k, mode, jax.random.fold_in(rng.key(seed, rng.SELECTION), k),
                           guard=guard, scores=scores)


def select_channels(params: Optional[policy_lib.Params], W, k: int, mode: str, key: jax.Array, *,
                    guard: Optional[np.ndarray] = None,
                    scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Kept channels (L, k), sorted, for gate matrices W (L, I, H) and a trained policy.

    sample: k rows drawn without replacement in proportion to keep = sigmoid(logit(u) + z) with
            fresh noise u (the reference's way); topk: the k largest logits z (no noise);
    random: k rows uniformly at random, ignoring the policy (a baseline);
    energy: the k largest `scores` (no policy, no noise).
    With `guard`, the guarded rows are kept first and the rest chosen as above among the others.
    """
    if mode not in MODES:
        raise UserError(f"--mode={mode} is unknown; use one of {', '.join(MODES)}")
    if mode == "compensated":
        raise ValueError("mode compensated chooses its channels with their re-fitted columns: "
                         "use method/compensated.select (run/prune_run.Selection.prune)")
    if mode == "energy":
        if scores is None:
            raise ValueError("mode energy needs channel scores")
        return np.asarray(_top(jnp.asarray(scores, jnp.float32), guard, k))
    guard = None if guard is None else jnp.asarray(guard, bool)
    return np.asarray(_select(params, W, k, mode, key, guard))


def _guarded(log_w, guard):
    return log_w if guard is None else jnp.where(guard, jnp.inf, log_w)


@functools.partial(jax.jit, static_argnames=("k",))
def _top(scores, guard, k):
    return sampling.topk_indices(_guarded(scores, guard), k)


@functools.partial(jax.jit, static_argnames=("k", "mode"))
def _select(params, W, k, mode, key, guard):
    L, I, _ = W.shape
    if mode == "random":
        return sampling.gumbel_top_k(key, _guarded(jnp.zeros((L, I), jnp.float32), guard), k)
    z = policy_lib.policy_logits(params, W)
    if mode == "topk":
        return sampling.topk_indices(_guarded(z, guard), k)
    u = sampling.uniform_noise(jax.random.fold_in(key, 0), L, I)
    log_keep = jax.nn.log_sigmoid(sampling.keep_logits(z, u))  # as sample_indices_from_logits
    return sampling.gumbel_top_k(jax.random.fold_in(key, 1), _guarded(log_keep, guard), k)


def slice_weights(weights: ModelWeights, indices: np.ndarray,
                  down_columns: Optional[np.ndarray] = None) -> ModelWeights:
    """A new ModelWeights whose layer l keeps intermediate channels indices[l] (shape (L, k));
    `down_columns` (L, H, k): the kept down_proj columns to write instead of the dense ones
    (compensated's re-fit).

    The result is again a plain model of its architecture with `intermediate_size = k`.
    """
    indices = np.asarray(indices)
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    if indices.ndim != 2 or indices.shape[0] != L:
        raise UserError(f"kept indices have shape {indices.shape}; expected ({L}, k) for {L} layers")
    if indices.size and (indices.min() < 0 or indices.max() >= I):
        raise UserError(f"kept indices must lie in [0, {I}); got [{indices.min()}, {indices.max()}]")
    k = indices.shape[1]
    layers = dict(weights.layers)
    for name in registry.row_sliced(weights.config):  # gather the kept channels of each layer
        rows = indices if layers[name].ndim == 2 else indices[:, :, None]
        layers[name] = np.take_along_axis(weights.layers[name], rows, axis=1)
    layers[registry.COLUMN_SLICED] = (np.take_along_axis(
        weights.layers[registry.COLUMN_SLICED], indices[:, None, :], axis=2)
        if down_columns is None else down_columns)
    config = dataclasses.replace(weights.config, intermediate_size=k)
    width_key = families.family_of(weights.config.model_type).width_key
    hf_config = {**weights.hf_config, width_key: k}
    return dataclasses.replace(weights, config=config, hf_config=hf_config, layers=layers)

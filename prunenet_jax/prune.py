"""Pruning a model: select the kept channels of every layer (`select_kept`, from the policy and
the seed's SELECTION stream), then slice them (`slice_weights`: rows S of gate/up, columns S of
down)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prunenet_jax import rng
from prunenet_jax.errors import UserError
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import sampling
from prunenet_jax.models import registry
from prunenet_jax.weights import ModelWeights


MODES = ("sample", "topk", "random")


def select_kept(params: dict, gate, ratio: float, mode: str, seed: int) -> np.ndarray:
    """Kept channels (L, k) at `ratio` for gate matrices (L, I, H) (host or device). The key
    depends on the seed and k only (stream rng.SELECTION), so one seed gives the same channels
    whatever else the run does."""
    k = sampling.num_kept(gate.shape[1], ratio)
    return select_channels(params, gate, k, mode, jax.random.fold_in(rng.key(seed, rng.SELECTION), k))


def select_channels(params: policy_lib.Params, W, k: int, mode: str, key: jax.Array) -> np.ndarray:
    """Kept channels (L, k), sorted, for gate matrices W (L, I, H) and a trained policy.

    sample: k rows drawn without replacement in proportion to keep = sigmoid(logit(u) + z) with
            fresh noise u (the reference's way); topk: the k largest logits z (no noise);
    random: k rows uniformly at random, ignoring the policy (a baseline).
    """
    if mode not in MODES:
        raise UserError(f"--mode={mode} is unknown; use one of {', '.join(MODES)}")
    return np.asarray(_select(params, W, k, mode, key))


@functools.partial(jax.jit, static_argnames=("k", "mode"))
def _select(params, W, k, mode, key):
    L, I, _ = W.shape
    if mode == "random":
        return sampling.gumbel_top_k(key, jnp.zeros((L, I), jnp.float32), k)
    z = policy_lib.policy_logits(params, W)
    if mode == "topk":
        return sampling.topk_indices(z, k)
    u = sampling.uniform_noise(jax.random.fold_in(key, 0), L, I)
    return sampling.sample_indices_from_logits(jax.random.fold_in(key, 1), sampling.keep_logits(z, u), k)


def slice_weights(weights: ModelWeights, indices: np.ndarray) -> ModelWeights:
    """A new ModelWeights whose layer l keeps intermediate channels indices[l] (shape (L, k)).

    The result is again a plain model of its architecture with `intermediate_size = k`.
    """
    indices = np.asarray(indices)
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    if indices.ndim != 2 or indices.shape[0] != L:
        raise UserError(f"kept indices have shape {indices.shape}; expected ({L}, k) for {L} layers")
    if indices.size and (indices.min() < 0 or indices.max() >= I):
        raise UserError(f"kept indices must lie in [0, {I}); got [{indices.min()}, {indices.max()}]")
    k = indices.shape[1]
    rows = indices[:, :, None]  # gather along the channel axis of each layer
    layers = dict(weights.layers)
    for name in (registry.GATE, registry.UP):
        layers[name] = np.take_along_axis(weights.layers[name], rows, axis=1)
    layers[registry.DOWN] = np.take_along_axis(weights.layers[registry.DOWN], indices[:, None, :], axis=2)
    for name in (registry.GATE_BIAS, registry.UP_BIAS):
        if name in layers:
            layers[name] = np.take_along_axis(weights.layers[name], indices, axis=1)
    config = dataclasses.replace(weights.config, intermediate_size=k)
    hf_config = {**weights.hf_config, "intermediate_size": k}
    return dataclasses.replace(weights, config=config, hf_config=hf_config, layers=layers)

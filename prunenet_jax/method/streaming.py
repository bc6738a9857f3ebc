"""The episode of episode.py for a gate stack too big for one device: the stack is streamed to the
device a chunk of layers at a time (twice per episode), with the same draws and updates."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from prunenet_jax.formats.layer_stack import layer_range
from prunenet_jax.method import episode, sampling, sharding, spectral


def stream_chunk(shape: tuple, dtype, cfg: episode.TrainConfig,
                 device_budget_bytes: Optional[int] = None) -> Optional[int]:
    """Layers per chunk when the gate stack (and its Grams) would not fit in the device budget,
    else None (the whole stack stays on the device). Budget: `device_budget_bytes`, else
    `sharding.device_budget_bytes()` (70% of the device's memory); CPU reports none: no streaming."""
    L, I, H = shape
    if device_budget_bytes is None:
        device_budget_bytes = sharding.device_budget_bytes()
    if device_budget_bytes is None:
        return None
    layer = I * H * sharding.device_dtype(dtype).itemsize
    grams = H * H * 4 if spectral.uses_downdate(I, H, sampling.num_kept(I, cfg.ratio),
                                                cfg.sv_method) else 0
    if L * (layer + grams) <= device_budget_bytes:
        return None
    return max(1, int(device_budget_bytes) // (2 * layer))  # a chunk and its successor in flight


@functools.lru_cache(maxsize=8)
def _chunk_fns(cfg: episode.TrainConfig, num_layers: int):
    """Jitted pieces of an episode over a chunk of layers starting at global layer `first`."""
    opt = episode.make_optimizer(cfg)

    def actions(params, W, ref_sv, key, first):
        S, u_loss = episode.sample_local(cfg, None, params, W, key, first)
        ks, rewards = spectral.layer_rewards(W, ref_sv, S, cfg.sv_method)
        return S, u_loss, ks, rewards

    def layer_steps(params, opt_state, W, S, u_loss, disc, first):
        return episode.layer_schedule(cfg, opt, num_layers, None, params, opt_state, W, S, u_loss, disc,
                               first)

    def grads(params, W, S, u_loss, disc):
        return episode.episode_grads(cfg, jnp.ones(W.shape[0], bool), None, params, W, S, u_loss, disc)

    step = functools.partial(episode.episode_step, opt)
    return tuple(jax.jit(f) for f in (actions, layer_steps, grads, step))


def _chunks(num_layers: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, num_layers)) for a in range(0, num_layers, chunk)]


def _place_chunk(W, start: int, stop: int) -> jax.Array:
    return sharding.place_stacked(layer_range(W, start, stop), sharding.make_mesh(1),
                                  dtype=sharding.device_dtype(W.dtype))


def streamed_reference_singular_values(W, chunk: int, method: str) -> jax.Array:
    return jnp.concatenate([episode.reference_singular_values(_place_chunk(W, a, b), method=method)
                            for a, b in _chunks(W.shape[0], chunk)])


def streamed_episode(cfg: episode.TrainConfig, state: episode.TrainState, W, ref_sv, key, chunk: int):
    """One episode on one device with the gate stack W (host array or LazyLayerStack) streamed
    to it `chunk` layers at a time, twice (actions and rewards with the episode's initial policy;
    then the updates). Same draws and updates as `make_episode_fn` (rewards from the kept rows'
    Grams directly: a full Gram costs more than the kept rows' when it is not kept)."""
    L = W.shape[0]
    actions, layer_steps, grads, step = _chunk_fns(cfg, L)
    ranges = _chunks(L, chunk)
    params, opt_state = state.params, state.opt_state
    parts = [actions(params, _place_chunk(W, a, b), ref_sv[a:b], key, a) for a, b in ranges]
    S, u_loss, ks, rewards = (jnp.concatenate(x) for x in zip(*parts))
    disc = rewards * episode.discount_factors(jnp.arange(L), cfg.gamma)
    losses, dv, dc = [], 0.0, 0.0
    for a, b in ranges:
        Wc = _place_chunk(W, a, b)
        if cfg.schedule == "layer":
            params, opt_state, lc = layer_steps(params, opt_state, Wc, S[a:b], u_loss[a:b],
                                                disc[a:b], a)
        else:
            g_v, g_c, lc = grads(params, Wc, S[a:b], u_loss[a:b], disc[a:b])
            dv, dc = dv + g_v, dc + g_c
        losses.append(lc)
    if cfg.schedule == "episode":
        params, opt_state = step(params, opt_state, dv, dc)
    metrics = episode.EpisodeMetrics(indices=S, ks=ks, rewards=rewards, discounted_rewards=disc,
                             losses=jnp.concatenate(losses), total_reward=jnp.sum(rewards))
    return episode.advance(state, params, opt_state, metrics.total_reward), metrics

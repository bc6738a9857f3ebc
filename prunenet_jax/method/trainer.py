"""Policy training: the host loop over episodes (`train`), and a run that survives being killed
(`train_policy`): the state is checkpointed after every
episode under `state_dir`, a rerun with `resume=True` continues from the last checkpoint, and the
trained policy is saved to `policy_dir` (formats/run_dir.py names both inside a run folder).

Resuming gives exactly the policy an uninterrupted run gives: episode e's randomness depends only
on the seed and e, and the checkpoint holds the whole state (policy, optimiser, best so far).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from prunenet_jax import rng
from prunenet_jax.errors import UserError
from prunenet_jax.formats import orbax
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import episode, sampling, sharding, spectral, streaming
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.resumable import Resumable


@dataclasses.dataclass
class TrainResult:
    state: episode.TrainState  # final state (params after the last episode, best_params, ...)
    history: list  # per episode: episode.EpisodeMetrics as host numpy arrays, cut to num_layers
    setup_seconds: float  # placing W and the reference spectra
    episode_seconds: list  # wall time per episode (the first includes compilation)


def episode_key(key: jax.Array, episode: int) -> jax.Array:
    """The key of episode `episode` of a run seeded with `key`."""
    return jax.random.fold_in(key, episode)


def initial_params(seed: int, intermediate_size: int, hidden_size: int) -> policy_lib.Params:
    """The policy a run seeded with `seed` starts from."""
    return policy_lib.init_params(rng.key(seed, rng.POLICY_INIT), intermediate_size, hidden_size)


def history_arrays(history: list) -> dict[str, np.ndarray]:
    """Per-episode host metrics stacked on a leading episode axis, one array per field."""
    return {f: np.stack([getattr(m, f) for m in history]) for f in episode.EpisodeMetrics._fields}


def history_from_arrays(arrays: dict[str, np.ndarray]) -> list:
    n = len(arrays["total_reward"])
    return [episode.EpisodeMetrics(**{f: np.asarray(arrays[f][e]) for f in episode.EpisodeMetrics._fields})
            for e in range(n)]


def history_template(num_episodes: int, num_layers: int, k: int) -> dict[str, np.ndarray]:
    """Zero arrays shaped like `history_arrays` of `num_episodes` episodes (for restoring)."""
    E, L = num_episodes, num_layers
    per_layer = lambda: np.zeros((E, L), np.float32)
    return {"indices": np.zeros((E, L, k), np.int32), "ks": per_layer(), "rewards": per_layer(),
            "discounted_rewards": per_layer(), "losses": per_layer(),
            "total_reward": np.zeros((E,), np.float32)}


def train(W: np.ndarray, cfg: episode.TrainConfig, *, params: Optional[policy_lib.Params] = None,
          seed: int = 42, num_episodes: int = 20, mesh: Optional[Mesh] = None,
          callback: Optional[Callable[[int, episode.EpisodeMetrics], None]] = None,
          resume_from: Optional[tuple[episode.TrainState, list]] = None,
          on_state: Optional[Callable[[int, episode.TrainState, list], None]] = None,
          device_budget_bytes: Optional[int] = None) -> TrainResult:
    """Trains the policy on host gate matrices W (L, I, H) for `num_episodes` episodes.

    `seed` fixes everything: key = jax.random.key(seed); the policy (when `params` is None) is
    initialised from fold_in(key, 0), episode e uses fold_in(fold_in(key, 1), e).
    `callback(episode, metrics)` is called after each episode with host metrics.
    `resume_from=(state, history)` (host arrays, e.g. restored from a checkpoint after
    `state.episode` episodes) continues that run: the result equals an uninterrupted run's.
    `on_state(episodes_done, state, history)` is called after each episode (for checkpointing).
    Without a mesh, a stack that does not fit `device_budget_bytes` (default: see `streaming.stream_chunk`)
    is streamed to the device in chunks of layers every episode (`streaming.streamed_episode`).
    """
    if num_episodes < 1:
        raise UserError(f"num_episodes={num_episodes}: train for at least one episode")
    L, I, H = W.shape
    start = time.perf_counter()
    ep_key = rng.key(seed, rng.EPISODES)
    if resume_from is not None:
        state, history = resume_from[0], list(resume_from[1])
    else:
        state = episode.init_state(initial_params(seed, I, H) if params is None else params, cfg)
        history = []
    first = int(np.asarray(state.episode))
    if first != len(history):
        raise ValueError(f"resume state is after {first} episodes but history has {len(history)}")
    # W (an array or a LazyLayerStack) goes to the device(s) a layer at a time, in its stored
    # dtype (bf16 stays bf16); no host copy of the stack is made or kept.
    # Without a mesh: a 1-device one, so that W, the state and the episode's outputs all have the
    # same sharding and the episode compiles once.
    place_on = mesh if mesh is not None else sharding.make_mesh(1)
    state = sharding.replicate(state, place_on)
    chunk = None if mesh is not None else streaming.stream_chunk(W.shape, W.dtype, cfg, device_budget_bytes)
    if chunk is not None:
        ref_sv = jax.block_until_ready(streaming.streamed_reference_singular_values(W, chunk, cfg.sv_method))
        run_episode = lambda state, key: streaming.streamed_episode(cfg, state, W, ref_sv, key, chunk)
    else:
        W_dev = sharding.place_stacked(W, place_on, dtype=sharding.device_dtype(W.dtype))
        grams = None
        if spectral.uses_downdate(I, H, sampling.num_kept(I, cfg.ratio), cfg.sv_method):
            grams = episode.layer_grams(W_dev, mesh=mesh)  # once per run: every episode downdates them
        ref_sv = jax.block_until_ready(episode.reference_singular_values(
            W_dev, mesh=mesh, method=cfg.sv_method, grams=grams))
        episode_fn = episode.cached_episode_fn(cfg, L, mesh)
        run_episode = lambda state, key: episode_fn(state, W_dev, ref_sv, key, grams)
    if not bool(sharding.to_host(episode.all_finite_fn(ref_sv))):
        raise UserError("the gate matrices' singular values are not finite (weights too large for "
                        "float32); the model cannot be pruned by its spectra")
    setup_seconds = time.perf_counter() - start
    seconds = []
    for e in range(first, num_episodes):
        t0 = time.perf_counter()
        state, metrics = run_episode(state, episode_key(ep_key, e))
        host = episode.EpisodeMetrics(*(sharding.to_host(m) for m in metrics))
        host = host._replace(**{f: host_f[:L] for f, host_f in host._asdict().items()
                                if f != "total_reward"})
        episode.check_finite_episode(e, host, state.params, cfg)
        history.append(host)
        seconds.append(time.perf_counter() - t0)  # to_host above waited for the episode
        if callback is not None:
            callback(e, host)
        if on_state is not None:
            on_state(e + 1, state, history)
    return TrainResult(state=state, history=history, setup_seconds=setup_seconds,
                       episode_seconds=seconds)


def _restore(loop: Resumable, config: ModelConfig, cfg: episode.TrainConfig, seed: int,
             episodes: int):
    I, H = config.intermediate_size, config.hidden_size
    template = episode.init_state(initial_params(seed, I, H), cfg)
    k = sampling.num_kept(I, cfg.ratio)
    state, history, done = loop.restore(
        template, lambda e: history_template(e, config.num_hidden_layers, k))
    if done > episodes:
        raise UserError(f"--resume: {loop.directory} is after {done} episodes but --episodes="
                        f"{episodes}; pass --episodes={done} or more, or start afresh")
    logging.info("resuming after episode %d of %d", done, episodes)
    return state, history_from_arrays(history)


def train_policy(W, config: ModelConfig, cfg: episode.TrainConfig, *, seed: int, episodes: int,
                 mesh: Optional[Mesh], state_dir: Optional[str], policy_dir: Optional[str],
                 resume: bool, source: str, checkpoint_every: int = 1) -> tuple[dict, dict]:
    """Trains on every process (W may be a LazyLayerStack); returns (host params of the best
    episode, a JSON-able training summary). With `state_dir`, checkpoints every
    `checkpoint_every` episodes (and after the last); without `resume` an old state there is
    discarded first; Ctrl-C stops after an episode (resumable.Resumable). With `policy_dir`,
    process 0 saves the policy there."""
    run_meta = {"seed": seed, "num_layers": config.num_hidden_layers,
                "intermediate_size": config.intermediate_size,
                "hidden_size": config.hidden_size, "train_config": dataclasses.asdict(cfg)}
    with Resumable(state_dir, run_meta, resume=resume, total=episodes, every=checkpoint_every,
                   unit="episode", desc="episodes", save_last=True, all_processes=True) as loop:
        resume_from = _restore(loop, config, cfg, seed, episodes) if loop.resuming else None
        done_before = 0 if resume_from is None else len(resume_from[1])
        loop.start(done_before)

        def on_episode(e, m):
            loop.advance(mean_ks=f"{float(np.mean(m.ks)):.4f}",
                         total_reward=f"{float(m.total_reward):.2f}")

        def on_state(done, state, history):
            loop.finished(done, lambda: (state, history_arrays(history)))

        result = train(W, cfg, seed=seed, num_episodes=episodes, mesh=mesh,
                       callback=on_episode, resume_from=resume_from, on_state=on_state)
    # Gathering to the host is a collective on multi-host runs: every process takes part.
    params = jax.tree.map(sharding.to_host, result.state.best_params)
    summary = {"best_episode": int(sharding.to_host(result.state.best_episode)),
               "best_total_reward": float(sharding.to_host(result.state.best_reward)),
               "episode_total_rewards": [float(m.total_reward) for m in result.history],
               "setup_seconds": result.setup_seconds, "episode_seconds": result.episode_seconds,
               "resumed_after": None if resume_from is None else done_before}
    if policy_dir and jax.process_index() == 0:
        orbax.save_policy(policy_dir, params, {
            "seed": seed, "train_config": dataclasses.asdict(cfg), "source": source,
            "episodes": episodes, "best_episode": summary["best_episode"],
            "best_total_reward": summary["best_total_reward"],
            "fingerprint": policy_lib.fingerprint(params)}, overwrite=True)
    return params, summary

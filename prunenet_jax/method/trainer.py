"""A policy-training run that survives being killed: the state is checkpointed after every
episode under `state_dir`, a rerun with `resume=True` continues from the last checkpoint, and the
trained policy is saved to `policy_dir` (run/run_dir.py names both inside a run folder).

Resuming gives exactly the policy an uninterrupted run gives: episode e's randomness depends only
on the seed and e, and the checkpoint holds the whole state (policy, optimiser, best so far).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from prunenet_jax import progress
from prunenet_jax.errors import Interrupted, UserError
from prunenet_jax.formats import orbax
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import sampling, sharding, train
from prunenet_jax.models.config import LlamaConfig


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _StopOnCtrlC:
    """While entered, Ctrl-C (SIGINT) asks training to stop after the running episode (one jitted
    call cannot be cut short) instead of raising in the middle of it; a second Ctrl-C interrupts
    at once. Only the main thread can handle signals: elsewhere this does nothing."""

    def __init__(self):
        self.asked, self._installed, self._previous = False, False, None

    def _restore(self):
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _ask(self, signum, frame):
        self.asked = True
        self._restore()
        progress.message("Ctrl-C: stopping after this episode (press it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(signal.SIGINT, self._ask), True
        return self

    def __exit__(self, *exc):
        if self._installed:
            self._restore()


def _restore(ckpts, config: LlamaConfig, cfg: train.TrainConfig, seed: int, episodes: int):
    I, H = config.intermediate_size, config.hidden_size
    template = train.init_state(train.initial_params(seed, I, H), cfg)
    k = sampling.num_kept(I, cfg.ratio)
    state, history, done = ckpts.restore(
        template, lambda e: train.history_template(e, config.num_hidden_layers, k))
    if done > episodes:
        raise UserError(f"--resume: {ckpts.directory} is after {done} episodes but --episodes="
                        f"{episodes}; pass --episodes={done} or more, or start afresh")
    logging.info("resuming after episode %d of %d", done, episodes)
    return state, train.history_from_arrays(history)


def train_policy(W, config: LlamaConfig, cfg: train.TrainConfig, *, seed: int, episodes: int,
                 mesh: Optional[Mesh], state_dir: Optional[str], policy_dir: Optional[str],
                 resume: bool, source: str, checkpoint_every: int = 1) -> tuple[dict, dict]:
    """Trains on every process (W may be a LazyLayerStack); returns (host params of the best
    episode, a JSON-able training summary). With `state_dir`, checkpoints every
    `checkpoint_every` episodes (and after the last); without `resume` an old state there is
    discarded first. With `policy_dir`, process 0 saves the policy there."""
    ckpts = resume_from = None
    if state_dir:
        path = state_dir
        if not resume and os.path.isdir(path) and jax.process_index() == 0:
            shutil.rmtree(path)  # the old run's resume points belong to the run being replaced
        _barrier("prunenet_train_state_cleared")
        run_meta = {"seed": seed, "num_layers": config.num_hidden_layers,
                    "intermediate_size": config.intermediate_size,
                    "hidden_size": config.hidden_size, "train_config": dataclasses.asdict(cfg)}
        ckpts = orbax.TrainCheckpoints(path, run_meta)
        if resume and ckpts.latest_episode() is not None:
            resume_from = _restore(ckpts, config, cfg, seed, episodes)

    done_before = 0 if resume_from is None else len(resume_from[1])
    bar = progress.bar(total=episodes, desc="episodes", initial=done_before,
                       disable=jax.process_index() != 0)

    def on_episode(e, m):
        bar.set_postfix(mean_ks=f"{float(np.mean(m.ks)):.4f}",
                        total_reward=f"{float(m.total_reward):.2f}")
        bar.update(1)

    stop = _StopOnCtrlC()

    def on_state(done, state, history):
        if ckpts is not None and (done % checkpoint_every == 0 or done == episodes or stop.asked):
            ckpts.save(done, state, train.history_arrays(history))
        if stop.asked:
            if ckpts is not None:
                ckpts.wait()  # the checkpoint of this finished episode is complete
            raise Interrupted(f"interrupted (Ctrl-C) after episode {done} of {episodes}" + (
                f"; the training state is saved in {ckpts.directory}: rerun the same command "
                "with --resume to continue" if ckpts is not None else ""))

    try:
        with stop:
            result = train.train(W, cfg, seed=seed, num_episodes=episodes, mesh=mesh,
                                 callback=on_episode, resume_from=resume_from, on_state=on_state)
    finally:  # also on an error: no checkpoint is left half written by a running save
        bar.close()
        if ckpts is not None:
            ckpts.wait()
            ckpts.close()
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

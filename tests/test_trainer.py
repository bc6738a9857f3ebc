"""method/trainer.py in process: a run stopped after some episodes and resumed ends with the
uninterrupted run's policy, bit for bit; a checkpoint of another run is refused."""
import numpy as np
import pytest

from prunenet_jax.errors import UserError
from prunenet_jax.formats import orbax
from prunenet_jax.method import trainer
from prunenet_jax.method.episode import TrainConfig
from prunenet_jax.models.config import ModelConfig

L, I, H = 3, 16, 4
CONFIG = ModelConfig(model_type="llama", vocab_size=8, hidden_size=H, intermediate_size=I,
                     num_hidden_layers=L, num_attention_heads=1, num_key_value_heads=1, head_dim=H,
                     norm_eps=1e-6)
CFG = TrainConfig(ratio=0.25)


def _train(tmp, episodes, resume, seed=0):
    W = np.random.default_rng(0).normal(size=(L, I, H)).astype(np.float32)
    return trainer.train_policy(W, CONFIG, CFG, seed=seed, episodes=episodes, mesh=None,
                                state_dir=str(tmp / "train_state"), policy_dir=str(tmp / "policy"),
                                resume=resume, source="tiny")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole, whole_summary = _train(tmp_path / "whole", 4, resume=False)
    _train(tmp_path / "split", 2, resume=False)  # "killed" after episode 2: its checkpoint stays
    resumed, summary = _train(tmp_path / "split", 4, resume=True)
    assert summary["resumed_after"] == 2 and whole_summary["resumed_after"] is None
    assert summary["episode_total_rewards"] == whole_summary["episode_total_rewards"]
    for n in ("P", "b", "r"):
        np.testing.assert_array_equal(resumed[n], whole[n])
    saved, meta = orbax.load_policy(str(tmp_path / "split" / "policy"))
    np.testing.assert_array_equal(saved["P"], whole["P"])
    assert meta["episodes"] == 4 and meta["best_episode"] == whole_summary["best_episode"]


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    _train(tmp_path, 1, resume=False, seed=0)
    with pytest.raises(UserError, match="belongs to another run .*seed: saved 0 vs now 1"):
        _train(tmp_path, 2, resume=True, seed=1)
    with pytest.raises(UserError, match="is after 1 episodes but --episodes=0|at least"):
        _train(tmp_path, 0, resume=True)

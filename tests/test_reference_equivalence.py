"""Our method against the authors' reference (`efficient-pruners` 0.1.0), on the fixture that
`bench/reference/export_fixture.py` exported from the reference's own code path: its initial
policy, sampling noise, sampled indices and loss-pass noise are fed in, and the rewards and the
policy after one episode must match.

The reference runs its policy under fp16 autocast; the fixture also holds fp32 replays of the same
episode through the reference's own module (same noise, no autocast, no GradScaler), which are the
targets for an fp32 implementation. Rewards do not involve the policy and are compared directly.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from prunenet_jax.method import policy
from prunenet_jax.method import train

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "reference", "episode_fixture.npz")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _inputs(ref):
    params = {"P": jnp.asarray(ref["init_P"]), "b": jnp.asarray(ref["init_b"]),
              "r": jnp.asarray(ref["init_r"])}
    W = jnp.asarray(ref["gate_w"])
    return params, W, train.reference_singular_values(W)


def _episode(ref, schedule):
    params, W, sv = _inputs(ref)
    cfg = train.TrainConfig(ratio=0.3, schedule=schedule)
    opt_state = train.make_optimizer(cfg).init(params)
    return train.update_from_actions(params, opt_state, W, sv, jnp.asarray(ref["idx"][0]),
                                     jnp.asarray(ref["loss_u"][0]), cfg)


def test_reference_singular_values(ref):
    _, _, sv = _inputs(ref)
    np.testing.assert_allclose(np.asarray(sv), ref["sv_ref"], rtol=1e-4)


def test_logits_equal_reference_fp32(ref):
    params, W, _ = _inputs(ref)
    np.testing.assert_allclose(np.asarray(policy.policy_logits(params, W)), ref["fp32_sample_z"],
                               rtol=1e-5, atol=1e-5)


def test_rewards_per_layer_equal_reference(ref):
    _, _, metrics = _episode(ref, "episode")
    np.testing.assert_allclose(np.asarray(metrics.ks), ref["ks"][0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.rewards), ref["reward"][0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.discounted_rewards), ref["discounted"][0], rtol=1e-5)


def test_episode_schedule_update_equals_reference(ref):
    params, _, metrics = _episode(ref, "episode")
    np.testing.assert_allclose(np.asarray(metrics.losses), ref["fp32_loss"], rtol=1e-4)
    init = ref["init_P"]
    moved = np.abs(np.asarray(params["P"]) - init).max()
    assert moved > 1e-4  # a real step happened (AdamW's first step moves each weight by ~lr)
    for name in ("P", "b", "r"):
        np.testing.assert_allclose(np.asarray(params[name]), ref[f"fp32_episode_after_{name}"],
                                   atol=5e-7, err_msg=name)


def test_layer_schedule_update_equals_paper_loop(ref):
    params, _, metrics = _episode(ref, "layer")
    np.testing.assert_allclose(np.asarray(metrics.losses), ref["fp32_layer_loss"], rtol=1e-4)
    for name in ("P", "b", "r"):
        np.testing.assert_allclose(np.asarray(params[name]), ref[f"fp32_layer_steps_{name}"][-1],
                                   atol=5e-7, err_msg=name)

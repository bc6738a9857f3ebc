import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from scipy import stats

from prunenet_jax.method import policy as pol
from prunenet_jax.method import sampling
from prunenet_jax.method import sharding, spectral
from prunenet_jax.method import episode as T
from prunenet_jax.method import streaming, trainer
from prunenet_jax.errors import UserError

L, I, H = 4, 24, 6
RATIO = 0.3
K = int((1 - RATIO) * I)  # 16


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((L, I, H)).astype(np.float32)
    ref_sv = np.linalg.svd(W.astype(np.float64), compute_uv=False).astype(np.float32)
    idx = np.sort(np.stack([rng.choice(I, K, replace=False) for _ in range(L)]), axis=1)
    u = rng.uniform(0.01, 0.99, (L, I)).astype(np.float32)
    params = pol.init_params(jax.random.key(1), I, H)
    # Rewards computed independently: numpy SVD + scipy KS.
    sliced = np.linalg.svd(np.take_along_axis(W, idx[:, :, None], 1).astype(np.float64),
                           compute_uv=False)
    R = np.array([1 / stats.ks_2samp(a, b).statistic for a, b in zip(ref_sv, sliced)])
    return dict(W=W, ref_sv=ref_sv, idx=idx, u=u, params=params, R=R, Rhat=0.99 ** np.arange(L) * R)


def _ref_layer_loss(params, W, S, u, Rhat, use_kl):
    """The reference's loss written plainly: naive logits, log of sigmoid."""
    z = pol.policy_logits_naive(params, W)
    keep = jax.nn.sigmoid(jnp.log(u) - jnp.log(1 - u) + z)
    loss = -Rhat * jnp.sum(jnp.log(keep[S]))
    if use_kl:
        a = jax.nn.sigmoid(z)
        loss = loss + jnp.sum(-jnp.log(a) * (1 - a) - a * jnp.log(1 - a) + jnp.log(0.5))
    return loss


_ref_value_and_grad = jax.jit(jax.value_and_grad(_ref_layer_loss), static_argnums=5)


def _torch_adamw():
    return dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def test_adamw_step_equals_torch():
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v) for k, v in pol.init_params(jax.random.key(0), 20, 8).items()}
    params["P"] = params["P"] * 4  # weights ~1: a wrong weight decay shows above 1e-6
    grads = [{k: rng.normal(0, s, v.shape).astype(np.float32) for k, v in params.items()}
             for s in (1.0, 0.1, 3.0)]
    for schedule in ("layer", "episode"):
        opt = T.make_optimizer(T.TrainConfig(ratio=RATIO, schedule=schedule))
        p = jax.tree.map(jnp.asarray, params)
        st = opt.init(p)
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        topt = torch.optim.AdamW(list(tp.values()), **_torch_adamw())
        assert topt.defaults["weight_decay"] == 0.01  # torch's default, which we copy
        for g in grads:
            g = {k: v * (30.0 if schedule == "episode" else 1.0) for k, v in g.items()}
            upd, st = opt.update(jax.tree.map(jnp.asarray, g), st, p)
            p = optax.apply_updates(p, upd)
            for k in tp:
                tp[k].grad = torch.tensor(g[k])
            if schedule == "episode":
                torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
            topt.step()
        for k in tp:
            np.testing.assert_allclose(p[k], tp[k].detach().numpy(), atol=1e-6, rtol=0,
                                       err_msg=f"{schedule}:{k}")
    # The check can fail: optax's own default weight decay (1e-4) gives a different result.
    p2 = jax.tree.map(jnp.asarray, params)
    o2 = optax.adamw(1e-3)
    s2 = o2.init(p2)
    for g in grads:
        u2, s2 = o2.update(jax.tree.map(jnp.asarray, g), s2, p2)
        p2 = optax.apply_updates(p2, u2)
    assert np.abs(np.asarray(p2["P"]) - tp["P"].detach().numpy()).max() > 1e-5


@pytest.mark.parametrize("use_kl", [False, True])
def test_layer_schedule_equals_python_loop(problem, use_kl):
    pb = problem
    cfg = T.TrainConfig(ratio=RATIO, schedule="layer", use_kl=use_kl)
    opt = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    # Plain Python loop: one optax step per layer, in order.
    p = pb["params"]
    st = opt.init(p)
    ref_losses = []
    for l in range(L):
        loss, g = _ref_value_and_grad(p, pb["W"][l], pb["idx"][l], pb["u"][l], pb["Rhat"][l],
                                      use_kl)
        ref_losses.append(float(loss))
        upd, st = opt.update(g, st, p)
        p = optax.apply_updates(p, upd)

    state = T.init_state(pb["params"], cfg)
    new_p, new_st, m = T.update_from_actions(state.params, state.opt_state, pb["W"], pb["ref_sv"],
                                             pb["idx"], pb["u"], cfg)
    np.testing.assert_allclose(m.rewards, pb["R"], rtol=1e-5)
    np.testing.assert_allclose(m.discounted_rewards, pb["Rhat"], rtol=1e-5)
    np.testing.assert_allclose(m.total_reward, pb["R"].sum(), rtol=1e-5)
    np.testing.assert_array_equal(m.indices, pb["idx"])
    np.testing.assert_allclose(m.losses, ref_losses, rtol=1e-4)
    moved = max(float(jnp.abs(p[k] - pb["params"][k]).max()) for k in p)
    assert moved > 1e-3  # L steps of size ~lr
    for k in p:
        np.testing.assert_allclose(new_p[k], p[k], atol=2e-6, rtol=0, err_msg=k)
    assert int(new_st[0].count) == L

    # Padded layers (zeros, beyond num_layers) change nothing.
    pad = lambda x: sharding.pad_layers(np.asarray(x), L + 3)
    fn = T.make_update_fn(cfg, num_layers=L)
    pp, pst, pm = fn(state.params, state.opt_state, pad(pb["W"]), pad(pb["ref_sv"]),
                     pad(pb["idx"]), pad(pb["u"]))  # zero noise in padded layers: log 0
    for k in p:
        np.testing.assert_allclose(pp[k], new_p[k], atol=1e-7, rtol=0)
    assert int(pst[0].count) == L
    np.testing.assert_allclose(pm.total_reward, m.total_reward, rtol=1e-6)
    assert (np.asarray(pm.rewards)[L:] == 0).all() and (np.asarray(pm.losses)[L:] == 0).all()


def test_episode_schedule_sums_losses_and_clips(problem):
    pb = problem
    cfg = T.TrainConfig(ratio=RATIO, schedule="episode")
    total = lambda p: sum(_ref_layer_loss(p, pb["W"][l], pb["idx"][l], pb["u"][l], pb["Rhat"][l],
                                          False) for l in range(L))
    g = jax.grad(total)(pb["params"])
    gnorm = float(optax.tree.norm(g))
    assert gnorm > 5.0  # so the clip at 1.0 is active
    adamw = optax.adamw(1e-3, weight_decay=0.01)
    upd, _ = adamw.update(jax.tree.map(lambda x: x / gnorm, g), adamw.init(pb["params"]),
                          pb["params"])
    expected = optax.apply_updates(pb["params"], upd)

    state = T.init_state(pb["params"], cfg)
    new_p, new_st, m = T.update_from_actions(state.params, state.opt_state, pb["W"], pb["ref_sv"],
                                             pb["idx"], pb["u"], cfg)
    for k in new_p:
        np.testing.assert_allclose(new_p[k], expected[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(jnp.sum(m.losses)), float(total(pb["params"])), rtol=1e-4)
    # One step, and Adam's first moment holds (1 - b1) * the CLIPPED gradient (global norm 1).
    clip_state, (adam_state, *_) = new_st
    assert int(adam_state.count) == 1
    for k in g:
        np.testing.assert_allclose(adam_state.mu[k], 0.1 * g[k] / gnorm, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(optax.tree.norm(adam_state.mu)) / 0.1, 1.0, rtol=1e-5)


def test_best_episode_keeps_the_sampling_params(problem):
    pb = problem
    cfg = T.TrainConfig(ratio=RATIO)
    step = T.make_episode_fn(cfg)
    state = T.init_state(pb["params"], cfg)
    W, ref_sv = jnp.asarray(pb["W"]), jnp.asarray(pb["ref_sv"])
    before, totals = [], []
    for e in range(6):
        before.append(state.params)
        state, m = step(state, W, ref_sv, jax.random.key(e))
        totals.append(float(m.total_reward))
        assert m.indices.shape == (L, K)
    best = int(np.argmax(totals))  # first maximum, as the strict '>' keeps
    assert int(state.episode) == 6
    assert int(state.best_episode) == best
    assert float(state.best_reward) == max(totals)
    after_best = before[best + 1] if best + 1 < 6 else state.params
    for k in pb["params"]:
        np.testing.assert_array_equal(state.best_params[k], before[best][k])
        assert not np.array_equal(state.best_params[k], after_best[k])


def test_saturated_logits_give_finite_loss_and_grads(problem):
    pb = problem
    z = jnp.array([-300.0, 300.0, -90.0, 0.0, 120.0])
    u = jnp.full(5, 0.5)
    S = jnp.array([0, 2, 4])
    with np.errstate(divide="ignore"):
        assert np.isinf(np.log(np.asarray(jax.nn.sigmoid(z)))).any()  # the naive way overflows
    for use_kl in (False, True):
        loss, g = jax.value_and_grad(T.layer_loss)(z, S, u, jnp.float32(2.0), use_kl)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(T.layer_loss(z, S, u, jnp.float32(2.0)), -2.0 * (-300 - 90),
                               rtol=1e-6)
    # A whole episode with a saturated policy stays finite.
    params = dict(pb["params"], P=pb["params"]["P"] * 1e4)
    for schedule in ("layer", "episode"):
        cfg = T.TrainConfig(ratio=RATIO, schedule=schedule, use_kl=True)
        state, m = T.make_episode_fn(cfg)(T.init_state(params, cfg), jnp.asarray(pb["W"]),
                                          jnp.asarray(pb["ref_sv"]), jax.random.key(0))
        z = pol.policy_logits(params, jnp.asarray(pb["W"]))
        assert float(jnp.abs(z).max()) > 200
        assert np.isfinite(np.asarray(m.losses)).all()
        assert all(np.isfinite(np.asarray(v)).all() for v in state.params.values())


def test_loss_noise_fresh_by_default_or_reused(problem):
    pb = problem
    W, ref_sv = jnp.asarray(pb["W"]), jnp.asarray(pb["ref_sv"])
    key = jax.random.key(3)
    # The sampling noise of an episode: the first of the three keys split from the episode key.
    u = sampling.uniform_noise(jax.random.split(key, 3)[0], L, I)
    z0 = pol.policy_logits(pb["params"], W[0])
    losses, prev_indices = {}, None
    for reuse in (False, True):
        cfg = T.TrainConfig(ratio=RATIO, reuse_noise=reuse)
        _, m = T.make_episode_fn(cfg)(T.init_state(pb["params"], cfg), W, ref_sv, key)
        with_u = T.layer_loss(z0, m.indices[0], u[0], m.discounted_rewards[0])
        losses[reuse] = (float(m.losses[0]), float(with_u))
        # the sampled rows are the same either way
        if reuse:
            np.testing.assert_array_equal(m.indices, prev_indices)
        prev_indices = m.indices
    np.testing.assert_allclose(losses[True][0], losses[True][1], rtol=1e-5)
    assert abs(losses[False][0] - losses[False][1]) > 1e-3 * abs(losses[False][1])


def test_train_loop_is_seeded_and_ratio_sets_k(problem):
    W = problem["W"]
    cfg = T.TrainConfig(ratio=0.5)
    a = trainer.train(W, cfg, seed=7, num_episodes=2)
    b = trainer.train(W, cfg, seed=7, num_episodes=2)
    c = trainer.train(W, cfg, seed=8, num_episodes=2)
    assert len(a.history) == 2 and a.history[0].indices.shape == (L, I // 2)
    for x, y in zip(a.history, b.history):
        np.testing.assert_array_equal(x.indices, y.indices)
    assert any(not np.array_equal(x.indices, y.indices) for x, y in zip(a.history, c.history))
    with pytest.raises(UserError):
        T.TrainConfig(ratio=1.0)
    with pytest.raises(UserError):
        T.TrainConfig(ratio=0.3, schedule="batch")


@pytest.mark.parametrize("I,H,ratio", [(48, 32, 0.3), (48, 32, 0.75)])  # k = 33 > H; k = 12 < H
def test_per_layer_rewards_differ_and_match_scipy(I, H, ratio):
    """Per-layer KS, reward and discounted reward of an episode against numpy SVD + scipy's
    ks_2samp, on layers whose KS differ (each layer its own spectrum shape), with k >= H and k < H
    (then the sliced spectrum is shorter than the reference's)."""
    rng = np.random.default_rng(3)
    L = 5
    # Layer l: rows scaled by a layer-specific spread; it drops its 2l largest rows and keeps
    # the next k, so slicing changes each layer's spectrum differently.
    W = np.stack([rng.normal(size=(I, H)) * np.exp(np.linspace(0, 1.5 * l, I))[:, None]
                  for l in range(L)]).astype(np.float32)
    cfg = T.TrainConfig(ratio=ratio, gamma=0.9)
    k = sampling.num_kept(I, ratio)
    idx = np.stack([np.sort(np.argsort(-np.linalg.norm(W[l], axis=1))[min(2 * l, I - k):][:k])
                    for l in range(L)]).astype(np.int32)
    params = trainer.initial_params(0, I, H)
    u = rng.uniform(0.01, 0.99, size=(L, I)).astype(np.float32)
    ref_sv = T.reference_singular_values(jnp.asarray(W))
    _, _, m = T.update_from_actions(params, T.make_optimizer(cfg).init(params), jnp.asarray(W), ref_sv,
                                    jnp.asarray(idx), jnp.asarray(u), cfg)
    want_ks = np.array([stats.ks_2samp(np.linalg.svd(W[l], compute_uv=False),
                                       np.linalg.svd(W[l][idx[l]], compute_uv=False)).statistic
                        for l in range(L)])
    assert len(np.unique(np.round(want_ks, 6))) == L  # every layer's KS differs
    np.testing.assert_allclose(np.asarray(m.ks), want_ks, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.rewards), 1.0 / want_ks, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m.discounted_rewards), 0.9 ** np.arange(L) / want_ks, rtol=1e-5)


def test_episode_with_downdated_grams_equals_direct():
    """The step's rewards from W^T W - W_R^T W_R equal those from the kept rows' Gram."""
    rng = np.random.default_rng(11)
    L, I, H = 4, 40, 12
    W = jnp.asarray(rng.standard_normal((L, I, H)).astype(np.float32))
    cfg = T.TrainConfig(ratio=0.3)  # k = 28 >= H and 12 rows dropped: the downdate is used
    assert spectral.uses_downdate(I, H, 28, cfg.sv_method)
    G = T.layer_grams(W)
    ref_sv = T.reference_singular_values(W, grams=G)
    np.testing.assert_allclose(ref_sv, T.reference_singular_values(W), rtol=1e-5)
    state = T.init_state(trainer.initial_params(0, I, H), cfg)
    step = T.make_episode_fn(cfg)
    for e in range(3):
        key = jax.random.key(e)
        s_direct, m_direct = step(state, W, ref_sv, key)
        s_down, m_down = step(state, W, ref_sv, key, G)
        np.testing.assert_array_equal(m_down.indices, m_direct.indices)
        np.testing.assert_array_equal(m_down.ks, m_direct.ks)
        state = s_down


def test_bf16_gate_matrices_train_like_their_fp32_values():
    """bf16 weights stay bf16 on the device and train exactly as the same values in fp32."""
    rng = np.random.default_rng(12)
    Wb = rng.standard_normal((3, 40, 12)).astype(jnp.bfloat16)
    cfg = T.TrainConfig(ratio=0.3)
    rb = trainer.train(Wb, cfg, seed=3, num_episodes=2)
    r32 = trainer.train(Wb.astype(np.float32), cfg, seed=3, num_episodes=2)
    assert sharding.device_dtype(Wb.dtype) == jnp.bfloat16
    for mb, m32 in zip(rb.history, r32.history):
        np.testing.assert_array_equal(mb.indices, m32.indices)
        np.testing.assert_array_equal(mb.ks, m32.ks)
    np.testing.assert_allclose(rb.state.params["P"], r32.state.params["P"], atol=1e-6)


@pytest.mark.parametrize("schedule", ["layer", "episode"])
def test_streamed_episodes_equal_resident_ones(schedule):
    """A stack that does not fit the device budget is streamed in chunks of layers; same run."""
    rng = np.random.default_rng(13)
    L, I, H = 5, 40, 12
    W = rng.standard_normal((L, I, H)).astype(np.float32)
    cfg = T.TrainConfig(ratio=0.3, schedule=schedule)
    budget = 2 * 2 * I * H * 4  # two layers per chunk: chunks [0, 2), [2, 4), [4, 5)
    assert streaming.stream_chunk(W.shape, W.dtype, cfg, budget) == 2
    assert streaming.stream_chunk(W.shape, W.dtype, cfg, 10**9) is None
    whole = trainer.train(W, cfg, seed=5, num_episodes=3)
    streamed = trainer.train(W, cfg, seed=5, num_episodes=3, device_budget_bytes=budget)
    for a, b in zip(whole.history, streamed.history):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.ks, b.ks)
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    for name in ("P", "b", "r"):
        np.testing.assert_allclose(streamed.state.params[name], whole.state.params[name],
                                   atol=1e-6)
    assert int(streamed.state.best_episode) == int(whole.state.best_episode)

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prunenet_jax.method import policy as pol


def _loss(logit_fn, cot):
    # A non-linear scalar of the logits, so every gradient path is exercised.
    return lambda params, W: jnp.sum(jnp.sin(logit_fn(params, W)) * cot)


def test_logits_and_grads_equal_naive_form_x64():
    with jax.enable_x64(True):
        L, I, H = 3, 11, 7
        params = pol.init_params(jax.random.key(0), I, H, dtype=jnp.float64)
        W = jax.random.normal(jax.random.key(1), (L, I, H), jnp.float64)
        cot = jax.random.normal(jax.random.key(2), (L, I), jnp.float64)
        z, z_naive = jax.jit(lambda p, W: (pol.policy_logits(p, W),
                                           pol.policy_logits_naive(p, W)))(params, W)
        assert z.dtype == jnp.float64 and z.shape == (L, I)
        np.testing.assert_allclose(z, z_naive, rtol=1e-12, atol=1e-12)
        g = jax.jit(jax.grad(_loss(pol.policy_logits, cot)))(params, W)
        g_naive = jax.jit(jax.grad(_loss(pol.policy_logits_naive, cot)))(params, W)
        for name in pol.PARAM_NAMES:
            assert float(jnp.max(jnp.abs(g_naive[name]))) > 1e-3  # non-trivial gradient
            np.testing.assert_allclose(g[name], g_naive[name], rtol=1e-10, atol=1e-12,
                                       err_msg=name)
        # Single layer (I, H) -> (I,)
        np.testing.assert_allclose(pol.policy_logits(params, W[1]), z_naive[1], rtol=1e-12)


def test_logits_float32_close_to_float64_reference():
    # The float32 path against a float64 numpy evaluation of the reference's (W P^T + b) r.
    I, H = 64, 24
    params = pol.init_params(jax.random.key(3), I, H)
    W = jax.random.normal(jax.random.key(4), (2, I, H))
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ref = ((np.asarray(W, np.float64) @ p64["P"].T + p64["b"]) @ p64["r"])[..., 0]
    z = np.asarray(pol.policy_logits(params, W), np.float64)
    scale = np.abs(ref).max()
    assert np.abs(z - ref).max() <= 1e-5 * scale


def test_no_intermediate_of_size_I_by_I():
    I, H = 96, 8  # I*I = 9216 elements; nothing in the computation should be that large
    params = pol.init_params(jax.random.key(0), I, H)
    W = jnp.ones((2, I, H))

    def f(params, W):
        return jnp.sum(pol.policy_logits(params, W) ** 2)

    for fn in (f, jax.grad(f)):
        jaxpr = jax.make_jaxpr(fn)(params, W)
        sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
        assert max(sizes) < I * I, max(sizes)
    # ...whereas the naive form does build it (the check can fail).
    naive = jax.make_jaxpr(lambda p, W: pol.policy_logits_naive(p, W))(params, W)
    assert max(int(np.prod(v.aval.shape)) for e in naive.eqns for v in e.outvars) >= I * I


def test_init_matches_torch_linear_default():
    I, H = 512, 64
    p = pol.init_params(jax.random.key(7), I, H)
    bound = 1 / math.sqrt(H)
    assert p["P"].shape == (I, H) and p["b"].shape == (I,) and p["r"].shape == (I, 1)
    for name in ("P", "b"):
        x = np.asarray(p[name])
        assert x.min() >= -bound and x.max() <= bound
        assert x.min() < -0.95 * bound and x.max() > 0.95 * bound  # the whole range is used
        assert abs(x.mean()) < 0.1 * bound
    r = np.asarray(p["r"])
    assert r.min() >= 0 and r.max() < 1 and r.min() < 0.02 and r.max() > 0.98
    # Same variance as torch's kaiming_uniform_(a=sqrt(5)) init of nn.Linear(H, I).weight.
    import torch
    torch.manual_seed(0)
    tw = torch.nn.Linear(H, I).weight.detach().numpy()
    assert abs(tw.std() - np.asarray(p["P"]).std()) < 0.03 * tw.std()
    assert abs(np.abs(tw).max() - bound) < 0.01 * bound


def test_module_and_plain_params_round_trip():
    m = pol.Policy(16, 8, rngs=nnx.Rngs(0))
    params = pol.to_params(m)
    assert set(params) == {"P", "b", "r"}
    W = jax.random.normal(jax.random.key(1), (3, 16, 8))
    np.testing.assert_array_equal(m(W), pol.policy_logits(params, W))

    shifted = jax.tree.map(lambda x: x + 1.0, params)
    m2 = pol.from_params(shifted)
    for name in pol.PARAM_NAMES:
        np.testing.assert_array_equal(pol.to_params(m2)[name], shifted[name])
    # split / merge keeps the values; nnx.state sees exactly the three Params.
    graphdef, state = nnx.split(m2)
    m3 = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(m3.P[...], shifted["P"])
    assert set(nnx.to_pure_dict(nnx.state(m2, nnx.Param))) == {"P", "b", "r"}

    pol.load_into(m, shifted)
    np.testing.assert_array_equal(m.r[...], shifted["r"])
    with pytest.raises(ValueError):
        pol.load_into(m, pol.init_params(jax.random.key(0), 16, 9))
    with pytest.raises(ValueError):
        pol.policy_logits(params, jnp.ones((3, 16, 9)))


def test_policy_fingerprint():
    rng = np.random.default_rng(0)
    p = {"P": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    fp = pol.fingerprint(p)
    want = hashlib.sha256(b"P:<f4:(4, 3);" + p["P"].tobytes() + b"b:<f4:(3,);" + p["b"].tobytes())
    assert fp == want.hexdigest()[:16]  # a stable format: fingerprints are recorded in manifests
    assert pol.fingerprint({k: jnp.asarray(v) for k, v in p.items()}) == fp
    assert pol.fingerprint(dict(reversed(list(p.items())))) == fp  # order-free
    assert pol.fingerprint({**p, "b": p["b"] + 1e-7}) != fp
    assert pol.fingerprint({**p, "b": p["b"].astype(np.float64)}) != fp
    assert pol.fingerprint({**p, "b": p["b"].reshape(1, 3)}) != fp

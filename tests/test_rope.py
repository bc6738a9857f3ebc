"""models/rope.py against transformers v5's rotary embedding modules: every rope type, partial
rotary, v4 and v5 config layouts, at lengths below and above the switch lengths."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.falcon import modeling_falcon
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama
from transformers.models.phi import modeling_phi
from transformers.models.phi3 import modeling_phi3

from prunenet_jax.errors import UserError
from prunenet_jax.models import rope as rope_lib

logging.getLogger("transformers").setLevel(logging.ERROR)

# What the caller passes per family (transformers' config classes): theta and partial keys and
# defaults, Phi-3's original_max_position_embeddings class default and legacy type names.
FAMILY = {
    "llama": ({}, modeling_llama.LlamaRotaryEmbedding),
    "falcon": ({}, modeling_falcon.FalconRotaryEmbedding),
    "phi": ({"partial_default": 0.5}, modeling_phi.PhiRotaryEmbedding),
    "gpt_neox": ({"theta_keys": ("rotary_emb_base",), "partial_keys": ("rotary_pct",),
                  "partial_default": 0.25}, modeling_gpt_neox.GPTNeoXRotaryEmbedding),
    "phi3": ({"original_max_position_embeddings": 4096,
              "type_aliases": rope_lib.PHI3_TYPE_ALIASES}, modeling_phi3.Phi3RotaryEmbedding),
}
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32}
RAMP = [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0]

# (id, model_type, v4-style config keys, lengths): each length L gives positions (2, L), the
# second row shifted by 3, so seq_len = L + 3. Lengths straddle the switch length (32 here).
CASES = [
    ("default", "llama", {"rope_theta": 500.0}, [8]),
    ("linear", "llama", {"rope_scaling": {"type": "linear", "factor": 2.5}}, [8, 60]),
    ("dynamic", "llama", {"rope_theta": 500.0, "rope_scaling": {
        "rope_type": "dynamic", "factor": 3.0}}, [20, 29, 30, 80]),
    ("dynamic_partial", "gpt_neox", {"rotary_pct": 0.5, "rope_scaling": {"type": "dynamic",
                                                                         "factor": 2.0}}, [10, 70]),
    ("yarn", "llama", {"rope_theta": 500.0, "max_position_embeddings": 128, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, [20, 90]),
    ("yarn_options", "llama", {"max_position_embeddings": 16384, "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
        "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0,
        "truncate": False}}, [20, 60]),
    ("yarn_attention", "llama", {"rope_theta": 50.0, "rope_scaling": {
        "type": "yarn", "factor": 2.0, "attention_factor": 1.3}}, [40]),
    ("yarn_null_factor", "llama", {"max_position_embeddings": 64, "rope_scaling": {
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}}, [40]),
    ("llama3", "llama", {"rope_theta": 500.0, "max_position_embeddings": 128, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}, [10, 90]),
    ("proportional", "llama", {"rope_parameters": {
        "rope_type": "proportional", "rope_theta": 300.0, "partial_rotary_factor": 0.5,
        "factor": 2.0}}, [30]),
    ("longrope", "phi3", {"max_position_embeddings": 128, "original_max_position_embeddings": 32,
                          "rope_scaling": {"type": "longrope", "short_factor": RAMP[::-1],
                                           "long_factor": RAMP}}, [20, 29, 30, 70]),
    ("longrope_su_partial", "phi3", {
        "hidden_size": 128, "max_position_embeddings": 96, "original_max_position_embeddings": 32,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {"type": "su", "short_factor": RAMP[:6] + RAMP[:6], "long_factor":
                         RAMP[2:] + RAMP[2:], "attention_factor": 1.1}}, [20, 70]),
    ("phi_partial_0.4", "phi", {"hidden_size": 160, "num_attention_heads": 2,
                                "partial_rotary_factor": 0.4}, [40]),
    ("phi_partial_default", "phi", {"rope_theta": 1000.0}, [40]),
    ("neox_rotary_pct", "gpt_neox", {"hidden_size": 128, "rotary_pct": 0.25,
                                     "rotary_emb_base": 5000}, [40]),
    ("neox_default_pct", "gpt_neox", {}, [40]),
    ("falcon", "falcon", {"rope_theta": 2000.0, "rope_scaling": {"type": "linear",
                                                                  "factor": 2.0}}, [40]),
]


def _configs(model_type, keys):
    """(transformers config, v4 dict, v5 dict): the v4 dict is what a v4 config.json holds, the
    v5 one what transformers v5 saves (`save_pretrained` writes `to_json_string()`)."""
    v4 = {"model_type": model_type, **SMALL, **json.loads(json.dumps(keys))}
    config = transformers.AutoConfig.for_model(**json.loads(json.dumps(v4)))
    return config, v4, json.loads(config.to_json_string())


def _rope(cfg, model_type, head_dim):
    return rope_lib.from_config(cfg, "config.json", head_dim,
                                max_position_embeddings=cfg["max_position_embeddings"],
                                **FAMILY[model_type][0])


def _positions(length):
    return np.stack([np.arange(length), np.arange(length) + 3])


_cos_sin = jax.jit(rope_lib.cos_sin, static_argnums=0)


@pytest.mark.parametrize("name,model_type,keys,lengths", CASES, ids=[c[0] for c in CASES])
def test_cos_sin_match_transformers(name, model_type, keys, lengths):
    config, v4, v5 = _configs(model_type, keys)
    head_dim = config.hidden_size // config.num_attention_heads
    rope = _rope(v5, model_type, head_dim)
    assert _rope(v4, model_type, head_dim) == rope, "v4 and v5 layouts read differently"
    assert hash(rope) == hash(_rope(v4, model_type, head_dim))
    for length in lengths:
        positions = _positions(length)
        # A fresh module per call: transformers' dynamic rope keeps the longest length it saw.
        module = FAMILY[model_type][1](config)
        want = module(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
        got = _cos_sin(rope, jnp.asarray(positions, jnp.int32))
        for w, g in zip(want, got):
            assert g.shape == tuple(w.shape) == (2, length, rope.dim) and g.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=0, atol=1e-5,
                                       err_msg=f"{name} at length {length}")


def test_static_parts_match_transformers_init():
    """inv_freq and attention scaling equal the module's buffers (no positions involved)."""
    for name, model_type, keys, _ in CASES:
        config, _, v5 = _configs(model_type, keys)
        rope = _rope(v5, model_type, config.hidden_size // config.num_attention_heads)
        module = FAMILY[model_type][1](config)
        np.testing.assert_allclose(rope_lib.inv_freq(rope), module.inv_freq.numpy(), rtol=2e-7,
                                   err_msg=name)
        assert rope_lib.attention_scaling(rope) == pytest.approx(module.attention_scaling,
                                                                 rel=1e-12), name


def test_read_fields():
    config, v4, v5 = _configs("gpt_neox", {"rotary_pct": 0.25, "rotary_emb_base": 5000})
    assert v5["rope_parameters"]["partial_rotary_factor"] == 0.25  # v5 moves it in
    rope = _rope(v5, "gpt_neox", 32)
    assert (rope.theta, rope.dim, rope.rope_type, rope.params) == (5000.0, 8, "default", ())
    config, _, v5 = _configs("phi3", dict((c[0], c[2]) for c in CASES)["longrope"])
    rope = _rope(v5, "phi3", 16)
    assert rope.rope_type == "longrope" and rope.param("short_factor") == tuple(RAMP[::-1])
    assert rope.param("original_max_position_embeddings") == 32
    # The family default (Phi-3: 4096) wins over rope_parameters, as the class attribute does.
    del v5["original_max_position_embeddings"]
    assert _rope(v5, "phi3", 16).param("original_max_position_embeddings") == 4096


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("model_type,keys", [("gpt_neox", {"rotary_pct": 0.25}),
                                             ("phi", {"hidden_size": 160, "num_attention_heads": 2,
                                                      "partial_rotary_factor": 0.4}),
                                             ("llama", {})])
def test_apply_matches_transformers(model_type, keys, dtype):
    config, _, v5 = _configs(model_type, keys)
    head_dim = config.hidden_size // config.num_attention_heads
    rope = _rope(v5, model_type, head_dim)
    positions = _positions(10)
    cos, sin = rope_lib.cos_sin(rope, jnp.asarray(positions))
    x = np.random.default_rng(0).standard_normal((2, 10, 3, head_dim)).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # values exact in both dtypes
    got = rope_lib.apply(jnp.asarray(x, dtype), cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    t = torch.from_numpy(x.copy())
    want, _ = modeling_gpt_neox.apply_rotary_pos_emb(
        t, t, torch.from_numpy(np.array(cos)), torch.from_numpy(np.array(sin)), unsqueeze_dim=2)
    assert np.array_equal(np.asarray(got[..., rope.dim:]), x[..., rope.dim:])  # passed through
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want.numpy(), atol=atol, rtol=0)


def _error(cfg, head_dim=16, **kw):
    cfg = {"max_position_embeddings": 32, **cfg}
    with pytest.raises(UserError) as info:
        rope_lib.from_config(cfg, "model/config.json", head_dim,
                             max_position_embeddings=cfg["max_position_embeddings"], **kw)
    return str(info.value)


def test_errors():
    msg = _error({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}})
    assert "'mrope'" in msg and "model/config.json" in msg
    assert all(t in msg for t in rope_lib.SUPPORTED)
    msg = _error({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    assert "yarn" in msg and "factor" in msg and "rope_parameters" in msg
    msg = _error({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8}})
    assert "short_factor" in msg and "long_factor" not in msg.split("lacks")[1]
    msg = _error({"rope_scaling": {"type": "llama3", "factor": 8.0}})
    assert "low_freq_factor" in msg and "high_freq_factor" in msg
    # int(20 * 0.25) = 5 rotary dims: odd.
    msg = _error({"rotary_pct": 0.25}, head_dim=20, partial_keys=("rotary_pct",))
    assert "= 5" in msg and "even" in msg
    assert "(0, 1]" in _error({"partial_rotary_factor": 1.5})
    # Bad values name the field.
    assert "'factor'" in _error({"rope_scaling": {"type": "linear", "factor": "2"}})
    assert "'rope_theta'" in _error({"rope_theta": -1.0})
    assert "'short_factor'" in _error({"rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                        "long_factor": [1.0] * 8}})
    assert "'high_freq_factor'" in _error({"rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}})
    assert "per-layer" in _error({"rope_parameters": {"full_attention": {"rope_type": "default"}}})

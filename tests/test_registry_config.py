"""models/registry.py and models/config.py in process: every supported architecture's config
and tensor names, GGUF names, bad configs."""
import numpy as np
import pytest

from prunenet_jax import rng
from prunenet_jax.errors import UserError
from prunenet_jax.method import policy, trainer
from prunenet_jax.models import registry
from prunenet_jax.models.config import ModelConfig

BASE = {"vocab_size": 32, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.mark.parametrize("model_type,qkv_bias", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_config_and_tensor_names(model_type, qkv_bias):
    cfg = ModelConfig.from_hf({**BASE, "model_type": model_type})
    assert (cfg.head_dim, cfg.qkv_bias, cfg.o_bias) == (4, qkv_bias, False)
    shapes = registry.expected_shapes(cfg)
    assert shapes[registry.GATE] == (2, 12, 8) and shapes[registry.DOWN] == (2, 8, 12)
    assert shapes[registry.K] == (2, 4, 8)  # one kv head of 4
    assert (registry.Q_BIAS in shapes) == qkv_bias and registry.LM_HEAD in shapes
    for name in registry.layer_tensor_names(cfg):  # every tensor has a GGUF name
        assert name in registry.GGUF_LAYER
    tied = ModelConfig.from_hf({**BASE, "model_type": model_type, "tie_word_embeddings": True})
    assert registry.LM_HEAD not in registry.expected_shapes(tied)


def test_rope_layouts_and_bad_configs():
    v4 = ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    v5 = ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v4 == v5 and v4.rope.theta == 5e5 and v4.rope.param("factor") == 8.0
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf({**BASE, "model_type": "gpt2"})
    with pytest.raises(UserError, match="field 'hidden_size' is missing"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "hidden_size"} | {"model_type": "llama"})
    with pytest.raises(UserError, match="rope type 'spiral' is not supported"):
        ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "spiral"}})
    window = ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 16})
    assert window.sliding_window == 16


def test_named_rng_streams_are_what_training_uses():
    """rng.POLICY_INIT/EPISODES name the streams method/episode.py derives from the seed."""
    import jax

    init = trainer.initial_params(7, 12, 8)
    named = policy.init_params(rng.key(7, rng.POLICY_INIT), 12, 8)
    for n in ("P", "b", "r"):
        np.testing.assert_array_equal(np.asarray(init[n]), np.asarray(named[n]))
    assert len({rng.POLICY_INIT, rng.EPISODES, rng.SELECTION}) == 3
    ep = trainer.episode_key(rng.key(7, rng.EPISODES), 3)
    assert jax.random.key_data(ep).tolist() == jax.random.key_data(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 1), 3)).tolist()


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 1), (8, 2)])
def test_fused_qkv_split_is_the_transformers_layout_and_fuse_inverts_it(heads, kv):
    """Rows are (kv, group + 2, D) blocks: Falcon's three layouts and GPT-NeoX's per-head one."""
    from prunenet_jax.models import fused_qkv

    D, H = 3, 5
    fused = np.arange((heads + 2 * kv) * D * H, dtype=np.float32).reshape(-1, H)
    q, k, v = fused_qkv.split(fused, heads, kv, D)
    blocks = fused.reshape(kv, heads // kv + 2, D, H)  # what transformers' Falcon views
    np.testing.assert_array_equal(q, blocks[:, :-2].reshape(-1, H))
    np.testing.assert_array_equal(k, blocks[:, -2].reshape(-1, H))
    np.testing.assert_array_equal(v, blocks[:, -1].reshape(-1, H))
    np.testing.assert_array_equal(fused_qkv.fuse(q, k, v, heads, kv, D), fused)
    bias = fused[:, 0]
    np.testing.assert_array_equal(fused_qkv.fuse(*fused_qkv.split(bias, heads, kv, D), heads, kv, D), bias)


@pytest.mark.parametrize("cfg,match", [
    ({"model_type": "mixtral", "num_local_experts": 8}, r"mixture-of-experts FFN \(num_local_experts=8\)"),
    ({"model_type": "bloom"}, "model_type 'bloom' is not supported; supported model types: "
                              "falcon, gemma2, gemma3_text, gpt_neox, llama, mistral, opt, phi, "
                              "phi3, qwen2, qwen3"),
    ({"model_type": "gemma3", "vision_config": {}}, r"a vision tower \(vision_config"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional"),
    ({"model_type": "falcon", "alibi": True}, "ALiBi"),
    ({"model_type": "llama", "hidden_act": "swiglu_x"}, "activation hidden_act='swiglu_x'"),
    ({"model_type": "opt", "ffn_dim": 12, "layer_norm_elementwise_affine": False},
     "layer_norm_elementwise_affine"),
])
def test_unsupported_families_and_features_are_named(cfg, match):
    with pytest.raises(UserError, match=match):
        ModelConfig.from_hf({**BASE, **cfg})


def test_family_roles():
    """The scored matrix is the first FFN matrix (gate, else fc1); fc1/fc2 are up/down."""
    opt = ModelConfig.from_hf({**BASE, "model_type": "opt", "ffn_dim": 12})
    llama = ModelConfig.from_hf({**BASE, "model_type": "llama"})
    assert registry.scored(opt) == registry.UP and registry.scored(llama) == registry.GATE
    assert registry.row_sliced(opt) == [registry.UP, registry.UP_BIAS]
    assert registry.row_sliced(llama) == [registry.GATE, registry.UP]
    assert registry.GATE not in registry.expected_shapes(opt)
    assert registry.expected_shapes(opt)[registry.POS_EMBED] == (2048 + 2, 8)

"""GGUF files of Phi-2, Falcon, GPT-NeoX, Qwen3, Phi-3, Gemma 2 and Gemma 3 models (llama.cpp
architectures phi2, falcon, gptneox, qwen3, phi3, gemma2, gemma3).

Each tiny random transformers checkpoint is written to a GGUF file in float32 as llama.cpp's
convert_hf_to_gguf.py (now its conversion/ package) writes it (`convert`, following its
Phi2Model, FalconModel, GPTNeoXModel, Qwen3Model (TextModel's metadata), Phi3MiniModel,
Gemma2Model and Gemma3Model: names from gguf's tensor map, their metadata, Falcon's and
GPT-NeoX's attn_qkv reordering, Phi-3's longrope factor tensors, Gemma's norms + 1), then loaded
with `load_gguf` and compared with the same checkpoint's Hugging Face folder: every canonical
tensor, the ModelConfig, and logits against transformers (also on rows past the windows and
Phi-3's longrope switch); for qwen3/gemma2/gemma3 also against transformers' own GGUF loader.

What those files cannot carry (so the test models are ones the converter writes exactly):
- Phi-2's and Falcon's FFN width: the converter writes feed_forward_length = 4 * hidden size, so a
  model of another width gives a file llama.cpp refuses too; we refuse it on the ffn_up shape.
  The test models use width 4 * hidden.
- GPT-NeoX's, Phi-2's and Falcon's rope theta: no rope.freq_base is written, so llama.cpp (and we)
  use 10000; a file that states one is followed.
- Falcon's context length: the converter writes 2048 whatever the model's (the one ModelConfig
  field that differs here: max_position_embeddings, also the rope's).
- The activation (each family's own: gelu_new, gelu, gelu), Phi's qk_layernorm (no llama.cpp
  name: not convertible), Falcon's alibi/sequential variants (not convertible).
- Qwen3's sliding window (none written; llama.cpp's qwen3 has none): the test model has
  use_sliding_window false.
- Gemma's query_pre_attn_scalar (none written): llama.cpp's rule, the head size except for the
  27B models (hidden / heads); the test models use the head size. Gemma 3's layer pattern (none
  written): Gemma 3's published every-6th-layer-global; the test model has six layers in it.
"""
import dataclasses
import json
import math
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from prunenet_jax.formats import gguf as gguf_format, hf_names
from prunenet_jax.models import decoder, families, registry
from prunenet_jax.models.config import ModelConfig
from tests import tiny_models

ARCH = {"phi": gguf.MODEL_ARCH.PHI2, "falcon": gguf.MODEL_ARCH.FALCON,
        "gpt_neox": gguf.MODEL_ARCH.GPTNEOX, "qwen3": gguf.MODEL_ARCH.QWEN3,
        "phi3": gguf.MODEL_ARCH.PHI3, "gemma2": gguf.MODEL_ARCH.GEMMA2,
        "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
WIDE = dict(intermediate_size=4 * tiny_models.BASE["hidden_size"])
HEAD = 16  # the head size of the tiny qwen3/gemma entries
# Gemma 3's published layer pattern (every 6th layer global), on six layers.
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]
# tiny_models entries and the overrides that make each one the converter writes exactly.
CASES = {
    "phi2": WIDE,
    "falcon_7b": WIDE,
    "falcon_new": WIDE,
    "neox_parallel": {},
    "neox_seq": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}),
    # Qwen3 files hold no sliding window (llama.cpp's qwen3 has none)
    "qwen3_windowed": dict(use_sliding_window=False),
    "phi3_longrope": {},  # longrope factors, partial rotary, window: all carried
    # Gemma files hold no query_pre_attn_scalar: llama.cpp takes the head size (not the 27B)
    "gemma2": dict(query_pre_attn_scalar=HEAD),
    "gemma3": dict(query_pre_attn_scalar=HEAD, num_hidden_layers=6, layer_types=GEMMA3_LAYERS),
}


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter (convert_hf_to_gguf.py, --outtype f32)


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that leaves out the metadata keys in `drop` (for files missing a fact)."""

    def __init__(self, path, arch, drop=()):
        self.drop = set(drop)
        super().__init__(str(path), arch)

    def add_key_value(self, key, val, vtype, sub_type=None):
        for kv_data in self.kv_data:  # Gemma3Model rewrites some of TextModel's keys: no warning
            kv_data.pop(key, None)
        if key not in self.drop:
            super().add_key_value(key, val, vtype, sub_type)


def _phi2_metadata(w, hp, layers):
    """Phi2Model.set_gguf_parameters."""
    rot_pct = hp["rope_parameters"]["partial_rotary_factor"]
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(hp["layer_norm_eps"])
    w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_add_bos_token(False)


def _falcon_kv_heads(hp):
    """FalconModel's n_head_kv: num_kv_heads, else n_head_kv, else 1."""
    return hp.get("num_kv_heads") or hp.get("n_head_kv", 1)


def _falcon_metadata(w, hp, layers):
    """FalconModel.set_gguf_parameters."""
    w.add_context_length(2048)  # "not in config.json"
    w.add_tensor_data_layout("jploski")  # qkv tensor transform
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(4 * hp["hidden_size"])
    w.add_block_count(layers)
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(_falcon_kv_heads(hp))
    w.add_layer_norm_eps(hp["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def _neox_metadata(w, hp, layers):
    """GPTNeoXModel.set_gguf_parameters (`rotary_pct`: v5 configs hold it in rope_parameters)."""
    rotary_pct = hp.get("rotary_pct", hp["rope_parameters"]["partial_rotary_factor"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_rope_dimension_count(int(rotary_pct * (hp["hidden_size"] // hp["num_attention_heads"])))
    w.add_head_count(hp["num_attention_heads"])
    w.add_parallel_residual(hp.get("use_parallel_residual", True))
    w.add_layer_norm_eps(hp["layer_norm_eps"])


def _falcon_qkv(name, data, hp):
    """FalconModel.modify_tensors: query_key_value from kv groups (each group's query heads, then
    its key and value head) to [all q | all k | all v]."""
    if "query_key_value" not in name:
        return data
    n_head, n_head_kv = hp["num_attention_heads"], _falcon_kv_heads(hp)
    head_dim = hp["hidden_size"] // n_head
    qkv = data.reshape(n_head_kv, n_head // n_head_kv + 2, head_dim, head_dim * n_head)
    q = qkv[:, :-2].reshape(n_head * head_dim, head_dim * n_head)
    k = qkv[:, [-2]].reshape(n_head_kv * head_dim, head_dim * n_head)
    v = qkv[:, [-1]].reshape(n_head_kv * head_dim, head_dim * n_head)
    return np.concatenate((q, k, v)).reshape(data.shape)


def _neox_qkv(name, data, hp):
    """GPTNeoXModel.modify_tensors: query_key_value (weight and bias) from per-head [q, k, v] to
    [all q | all k | all v]."""
    if "attention.query_key_value" not in name:
        return data
    n_head, n_embd = hp["num_attention_heads"], hp["hidden_size"]
    qkv = data.reshape(n_head, 3, n_embd // n_head, *data.shape[1:])
    return np.concatenate([qkv[:, j].reshape(-1, *data.shape[1:]) for j in range(3)])


def _text_model_metadata(w, hp, layers):
    """TextModel.set_gguf_parameters (conversion/base.py), for the fields these configs have:
    the rope from rope_parameters (its full_attention part for Gemma 3), rope.freq_base_swa from
    a sliding_attention part, head_dim as key/value length."""
    w.add_block_count(layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    rope = hp.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear" and full.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    elif full.get("rope_type") == "yarn" and full.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    if full.get("rope_theta") is not None:
        w.add_rope_freq_base(full["rope_theta"])
    if rope.get("sliding_attention", {}).get("rope_theta") is not None:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def _phi3_metadata(w, hp, layers):
    """Phi3MiniModel.set_gguf_parameters (conversion/phi.py; TextModel's is not called). Its
    rope_parameters hold the top-level original_max_position_embeddings (ModelBase merges it)."""
    rope = {"original_max_position_embeddings": hp.get("original_max_position_embeddings"),
            **hp["rope_parameters"]}
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_sliding_window(hp.get("sliding_window") or 0)


def _phi3_extra_tensors(w, hp):
    """Phi3MiniModel.generate_extra_tensors: the longrope factors, and the attention factor."""
    rope = hp["rope_parameters"]
    if not rope.get("long_factor"):
        return {}
    scale = hp["max_position_embeddings"] / rope["original_max_position_embeddings"]
    original = rope["original_max_position_embeddings"]
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original))
                                    if scale > 1.0 else 1.0)
    return {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}


def _gemma2_metadata(w, hp, layers):
    """Gemma2Model.set_gguf_parameters (conversion/gemma.py; TextModel's is not called)."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])


def _gemma3_metadata(w, hp, layers):
    """Gemma3Model.set_gguf_parameters (conversion/gemma.py): TextModel's, then its own."""
    _text_model_metadata(w, hp, layers)
    rope = hp["rope_parameters"]
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    assert hp.get("attn_logit_softcapping") is None
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def _gemma_norms(name, data, hp):
    """Gemma2Model/Gemma3Model.modify_tensors: every norm weight + 1 (Gemma's RMSNorm is
    x * (1 + w), llama.cpp's x * w), in the checkpoint's dtype (float32 here)."""
    return data + np.float32(1) if name.endswith("norm.weight") else data


METADATA = {"phi": _phi2_metadata, "falcon": _falcon_metadata, "gpt_neox": _neox_metadata,
            "qwen3": _text_model_metadata, "phi3": _phi3_metadata, "gemma2": _gemma2_metadata,
            "gemma3_text": _gemma3_metadata}
MODIFY = {"phi": lambda name, data, hp: data, "falcon": _falcon_qkv, "gpt_neox": _neox_qkv,
          "qwen3": lambda name, data, hp: data, "phi3": lambda name, data, hp: data,
          "gemma2": _gemma_norms, "gemma3_text": _gemma_norms}
EXTRA_TENSORS = {"phi3": _phi3_extra_tensors}


def converter_hparams(folder):
    """config.json as the converter reads it. transformers writes num_kv_heads = heads for a
    multi-query Falcon too; the original checkpoints' config.json (tiiuae/falcon-7b) has none, so
    the converter reads n_head_kv = 1: we drop it to match them."""
    with open(os.path.join(folder, "config.json")) as f:
        hp = json.load(f)
    if hp["model_type"] == "falcon" and hp["multi_query"] and not hp["new_decoder_architecture"]:
        hp.pop("num_kv_heads", None)
    return hp


def convert(folder, path, drop=(), extra=None, fuse_phi_qkv=False, pad=False, pattern=None,
            skip_tensors=()):
    """The GGUF file convert_hf_to_gguf.py --outtype f32 writes for the checkpoint in `folder`:
    its metadata and tensors renamed by gguf's tensor map (plus a token list of the vocabulary
    size and bos/eos ids, as the vocab step does; `pad`: the pad id too). `drop`: metadata keys
    left out; `extra`: float keys added; `fuse_phi_qkv`: Phi-2's q/k/v written as one attn_qkv, as
    a `Wqkv` checkpoint gives; `pattern`: an attention.sliding_window_pattern (no converter of
    these architectures writes one); `skip_tensors`: tensors left out."""
    hp = converter_hparams(folder)
    model_type, layers = hp["model_type"], hp["num_hidden_layers"]
    arch = ARCH[model_type]
    w = _Writer(path, gguf.MODEL_ARCH_NAMES[arch], drop)
    METADATA[model_type](w, hp, layers)
    tensors = EXTRA_TENSORS.get(model_type, lambda w, hp: {})(w, hp)
    for key, value in (extra or {}).items():
        w.add_float32(key, value)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    w.add_token_list([f"t{i}" for i in range(hp["vocab_size"])])
    w.add_bos_token_id(hp["bos_token_id"])
    w.add_eos_token_id(hp["eos_token_id"])
    if pad:
        w.add_pad_token_id(hp["pad_token_id"])
    names = gguf.get_tensor_name_map(arch, layers)
    for name, data in load_file(os.path.join(folder, "model.safetensors")).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name  # the converter's "Can not map tensor"
        tensors[gguf_name] = MODIFY[model_type](name, data, hp).astype(np.float32)
    if fuse_phi_qkv:
        for i in range(layers):
            for kind in ("weight", "bias"):
                parts = [tensors.pop(f"blk.{i}.attn_{p}.{kind}") for p in "qkv"]
                tensors[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(parts)
    for gguf_name, data in tensors.items():
        if gguf_name not in skip_tensors:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---------------------------------------------------------------------------------------------
# Each case: tensors, config and logits against the HF folder and transformers


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    hf = tiny_models.make_hf_model(name, **CASES[name])
    folder = tiny_models.save_hf_model(hf, tmp / "hf")
    path = convert(folder, tmp / f"{name}.gguf")
    return name, hf, folder, path, gguf_format.load_gguf(path)


def _shifted_norms(weights):
    """The HF folder's tensors as a Gemma file holds them after our load: each norm weight w
    went through the converter's float32 w + 1 and our - 1 (exact up to that rounding)."""
    shift = families.gguf_transforms(weights.config)
    one = np.float32(1)
    return {name: shift[name](arr + one) if name in shift else arr
            for name, arr in {**weights.globals, **weights.layers}.items()}


def _assert_same_tensors(ours, want):
    assert ours.globals.keys() == want.globals.keys()
    assert ours.layers.keys() == want.layers.keys()
    shifted = families.family_of(want.config.model_type).gguf_norm_shift
    expected = _shifted_norms(want) if shifted else {**want.globals, **want.layers}
    for name, arr in {**ours.globals, **ours.layers}.items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
        # within float32 rounding of w + 1 of the HF weights themselves
        original = want.globals.get(name, want.layers.get(name))
        np.testing.assert_allclose(arr, original, rtol=0, atol=2.5e-7, err_msg=name)


def test_every_tensor_equals_the_hf_folders(case):
    name, _, folder, path, weights = case
    want = sources.load_model(folder)
    _assert_same_tensors(weights, want)
    assert weights.gguf_file == path and weights.hf_config["architectures"] == \
        want.hf_config["architectures"]
    # the scored matrix (gate; fc1 = ffn_up of a plain MLP; Phi-3: the first half of its fused
    # ffn_up) read lazily as the method reads it
    config, stack = gguf_format.gguf_gate_stack(path)
    assert config == weights.config
    scored = registry.scored(config)
    for i in range(config.num_hidden_layers):
        np.testing.assert_array_equal(stack[i], want.layers[scored][i])


def test_config_equals_the_hf_folders(case):
    name, _, folder, _, weights = case
    want = sources.load_config(folder)
    got = weights.config
    if got.model_type == "falcon":  # FalconModel writes context_length 2048
        assert got.max_position_embeddings == 2048 and want.max_position_embeddings == 512
        n = want.max_position_embeddings
        got = dataclasses.replace(got, max_position_embeddings=n,
                                  rope=dataclasses.replace(got.rope, max_position_embeddings=n))
    assert got == want
    assert gguf_format.load_gguf_config(weights.gguf_file) == weights.config
    # transformers reads the config dict as we do (it is what an HF export writes)
    theirs = transformers.AutoConfig.for_model(**weights.hf_config).to_dict()
    assert ModelConfig.from_hf(theirs) == weights.config


def _logits_diff(hf, weights):
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(want).max() > 0.1  # not between near-zero logits
    return float(np.abs(got - want)[mask.astype(bool)].max())


def test_logits_match_transformers(case):
    _, hf, _, _, weights = case
    assert _logits_diff(hf, weights) < 1e-4


def test_long_rows_match_transformers(case):
    """Rows of 150 tokens: past the tiny models' windows (64) and Phi-3's longrope switch (64),
    so the windowed layers, both ropes of Gemma 3 and the long factors are all exercised."""
    _, hf, _, _, weights = case
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    tokens = np.random.default_rng(2).integers(0, hf.config.vocab_size, (2, 150))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(got - want).max() < 2e-4, np.abs(got - want).max()


def test_falcon_7b_as_transformers_loads_the_gguf(tmp_path):
    """transformers reads Falcon GGUF files too (multi-query ones only: it neither undoes the
    converter's qkv reordering nor reads the kv head count, so falcon_new fails in it)."""
    hf = tiny_models.make_hf_model("falcon_7b", **WIDE)
    folder = tiny_models.save_hf_model(hf, tmp_path / "hf")
    path = convert(folder, tmp_path / "hf" / "falcon.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="falcon.gguf",
                                                  dtype=torch.float32).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    weights = gguf_format.load_gguf(path)
    assert weights.config == ModelConfig.from_hf(theirs.config.to_dict())
    assert _logits_diff(theirs, weights) < 1e-4


# ---------------------------------------------------------------------------------------------
# What the files cannot say: followed where stated, refused where it matters


def _model_and_file(tmp_path, name, **kwargs):
    overrides = kwargs.pop("overrides", CASES.get(name, {}))
    hf = tiny_models.make_hf_model(name, **overrides)
    folder = tiny_models.save_hf_model(hf, tmp_path / "hf")
    return hf, folder, convert(folder, tmp_path / f"{name}.gguf", **kwargs)


def test_ffn_width_other_than_4_hidden_is_refused(tmp_path):
    """Phi2Model and FalconModel write feed_forward_length = 4 * hidden size: a narrower FFN gives a
    file llama.cpp refuses too, and so do we, naming the tensor."""
    for name in ("phi2", "falcon_7b"):
        _, _, path = _model_and_file(tmp_path / name, name, overrides={})  # width 48 / 64
        with pytest.raises(UserError, match=r"blk\.0\.ffn_up\.weight") as e:
            gguf_format.load_gguf(path)
        assert path in str(e.value)


def test_rope_theta_is_llama_cpps_default_unless_stated(tmp_path):
    """GPTNeoXModel writes no rope.freq_base: neox_seq's theta 5000 becomes llama.cpp's 10000; a
    file that states rope.freq_base is followed (logits equal transformers')."""
    hf, _, path = _model_and_file(tmp_path / "plain", "neox_seq", overrides={})
    assert gguf_format.load_gguf_config(path).rope.theta == 10000.0
    hf, _, path = _model_and_file(tmp_path / "stated", "neox_seq", overrides={},
                                  extra={"gptneox.rope.freq_base": 5000.0})
    weights = gguf_format.load_gguf(path)
    assert weights.config.rope.theta == 5000.0
    assert _logits_diff(hf, weights) < 1e-4


def test_phi2_fused_attn_qkv(tmp_path):
    """Phi-2 files converted from the `Wqkv` checkpoints hold one attn_qkv, rows [q | k | v]."""
    hf, folder, path = _model_and_file(tmp_path, "phi2", fuse_phi_qkv=True)
    assert "blk.0.attn_qkv.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    _assert_same_tensors(gguf_format.load_gguf(path), sources.load_model(folder))


def test_falcon_qkv_layout_must_be_stated(tmp_path):
    """Without tensor_data_layout the order of attn_qkv's rows is unknown: refused for grouped kv
    heads, read for one kv head (where both orders coincide)."""
    _, _, path = _model_and_file(tmp_path / "new", "falcon_new", drop={"falcon.tensor_data_layout"})
    with pytest.raises(UserError, match="falcon.tensor_data_layout") as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)
    hf, _, path = _model_and_file(tmp_path / "7b", "falcon_7b", drop={"falcon.tensor_data_layout"})
    assert _logits_diff(hf, gguf_format.load_gguf(path)) < 1e-4


@pytest.mark.parametrize("key", ["gptneox.use_parallel_residual", "gptneox.rope.dimension_count",
                                 "gptneox.attention.layer_norm_epsilon"])
def test_missing_neox_metadata_is_named(tmp_path, key):
    _, _, path = _model_and_file(tmp_path, "neox_parallel", drop={key})
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)


def test_unsupported_architecture_is_one_line(tmp_path):
    path = str(tmp_path / "bloom.gguf")
    w = gguf.GGUFWriter(path, "bloom")  # an architecture llama.cpp has and we do not read
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError) as e:
        gguf_format.load_gguf(path)
    message = str(e.value)
    assert message.startswith(f"{path}: GGUF architecture 'bloom' is not supported")
    assert ("supported GGUF architectures: falcon, gemma2, gemma3, gptneox, llama, phi2, phi3, "
            "qwen2, qwen3") in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Qwen3, Phi-3, Gemma 2, Gemma 3: transformers' own GGUF loader, and what the files cannot say

# Overrides under which transformers' GGUF loader reads the file as we do: it takes no
# attention.key_length for qwen3 (Qwen3Config's head_dim 128 stands), no query_pre_attn_scalar,
# rope scaling or final softcap for Gemma (their config defaults stand: 256, none, none), so the
# models use those values, as the released ones do (Gemma 3 270M: head size 256, no scaling).
AS_TRANSFORMERS_READS = {
    "qwen3_windowed": dict(use_sliding_window=False, head_dim=128),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6,
                   layer_types=GEMMA3_LAYERS, final_logit_softcapping=None,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 1e4}}),
}


@pytest.mark.parametrize("name", sorted(AS_TRANSFORMERS_READS))
def test_transformers_loads_the_same_gguf(tmp_path, name):
    hf = tiny_models.make_hf_model(name, **AS_TRANSFORMERS_READS[name])
    folder = tiny_models.save_hf_model(hf, tmp_path / "hf")
    path = convert(folder, tmp_path / "hf" / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    ours = gguf_format.load_gguf(path)
    state = theirs.state_dict()
    for hf_name, arr in hf_names.hf_named_arrays(ours.config, ours.globals, ours.layers):
        # transformers subtracts Gemma's 1 as we do
        np.testing.assert_array_equal(arr, state[hf_name].numpy(), err_msg=hf_name)
    # transformers keeps float32 metadata unrounded (9.999999974752427e-07 for 1e-06)
    theirs_config = ModelConfig.from_hf(theirs.config.to_dict())
    assert dataclasses.replace(theirs_config, norm_eps=ours.config.norm_eps) == ours.config
    assert _logits_diff(theirs, ours) < 1e-4


def test_phi3_transformers_reads_the_same_tensors(tmp_path):
    """transformers reads Phi-3 files too, but neither the longrope factors nor the partial rotary
    (rope.dimension_count): its logits differ; its tensors (fused qkv_proj, gate_up_proj) are ours."""
    hf = tiny_models.make_hf_model("phi3_longrope")
    folder = tiny_models.save_hf_model(hf, tmp_path / "hf")
    path = convert(folder, tmp_path / "hf" / "m.gguf", pad=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    assert theirs.config.rope_parameters["rope_type"] == "default"  # what it cannot read
    assert _logits_diff(hf, gguf_format.load_gguf(path)) < 1e-4  # we do


def test_qwen3_window_is_not_carried(tmp_path):
    """A Qwen3 with use_sliding_window: the file holds no window (llama.cpp's qwen3 has none), so
    the model reads without one, as llama.cpp runs it; short rows still match transformers."""
    hf, _, path = _model_and_file(tmp_path, "qwen3_windowed", overrides={})
    assert hf.config.use_sliding_window
    config = gguf_format.load_gguf_config(path)
    assert config.windowed() is None and config.qk_norm
    assert _logits_diff(hf, gguf_format.load_gguf(path)) < 1e-4  # 12 tokens: inside the window


def test_qwen3_head_size_from_attn_q(tmp_path):
    """Without attention.key_length (a config.json without head_dim) the head size is attn_q's
    rows / heads; transformers' would be Qwen3Config's default 128."""
    hf, _, path = _model_and_file(tmp_path, "qwen3_windowed",
                                  drop={"qwen3.attention.key_length", "qwen3.attention.value_length"})
    assert gguf_format.load_gguf_config(path).head_dim == HEAD
    assert _logits_diff(hf, gguf_format.load_gguf(path)) < 1e-4


def test_gemma_query_scale_is_llama_cpps(tmp_path):
    """No query_pre_attn_scalar in Gemma files: llama.cpp scales by the head size, except for the
    27B models (Gemma 2: 46 layers, Gemma 3: 62), hidden / heads; so do we."""
    _, _, path = _model_and_file(tmp_path / "g2", "gemma2", overrides={})  # 12 in config.json
    assert gguf_format.load_gguf_config(path).attn_scale == HEAD ** -0.5
    for arch, layers in (("gemma2", 46), ("gemma3", 62)):
        meta = str(tmp_path / f"{arch}_27b.gguf")
        w = gguf.GGUFWriter(meta, arch)
        w.add_block_count(layers)
        w.add_embedding_length(64)
        w.add_feed_forward_length(96)
        w.add_head_count(8)
        w.add_head_count_kv(4)
        w.add_key_length(16)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_sliding_window(32)
        w.add_token_list([f"t{i}" for i in range(11)])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf_format.load_gguf_config(meta).attn_scale == (64 // 8) ** -0.5


def test_gemma3_layer_pattern_and_local_base(tmp_path):
    """Gemma 3 files hold the window but not which layers use it: Gemma 3's published pattern
    (every 6th layer global) unless attention.sliding_window_pattern says otherwise; the local
    rope base is rope.freq_base_swa or Gemma 3's 10000; no window at all: every layer global."""
    overrides = dict(query_pre_attn_scalar=HEAD)  # config.json: [sliding, full, sliding]
    hf, folder, path = _model_and_file(tmp_path / "plain", "gemma3", overrides=overrides)
    config = gguf_format.load_gguf_config(path)
    assert config.layer_types == ("sliding_attention",) * 3  # the published pattern, not the model's
    assert hf.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    # a file that states the pattern is followed, and then matches transformers on long rows
    _, _, stated = _model_and_file(tmp_path / "stated", "gemma3", overrides=overrides,
                                   pattern=[True, False, True])
    weights = gguf_format.load_gguf(stated)
    assert weights.config == sources.load_config(folder)
    _, _, period = _model_and_file(tmp_path / "period", "gemma3", overrides=overrides, pattern=2)
    assert gguf_format.load_gguf_config(period).layer_types == weights.config.layer_types
    # the local base: stated (rope.freq_base_swa), else 10000
    _, _, local = _model_and_file(tmp_path / "local", "gemma3",
                                  extra={"gemma3.rope.freq_base_swa": 50000.0})
    assert gguf_format.load_gguf_config(local).rope_local.theta == 50000.0
    _, _, default = _model_and_file(tmp_path / "default", "gemma3",
                                    drop={"gemma3.rope.freq_base_swa"})
    assert gguf_format.load_gguf_config(default).rope_local.theta == 10000.0
    # no window (a config with sliding_window_pattern 1): every layer global
    _, _, full = _model_and_file(tmp_path / "full", "gemma3", drop={"gemma3.attention.sliding_window"})
    assert set(gguf_format.load_gguf_config(full).layer_types) == {"full_attention"}


def test_phi3_longrope_facts(tmp_path):
    """Longrope factors need rope.scaling.original_context_length and both factor tensors (refused
    by name without them); an attention factor other than longrope's own is followed."""
    _, _, path = _model_and_file(tmp_path / "orig", "phi3_longrope",
                                 drop={"phi3.rope.scaling.original_context_length"})
    with pytest.raises(UserError, match=r"phi3\.rope\.scaling\.original_context_length") as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)
    _, _, path = _model_and_file(tmp_path / "short", "phi3_longrope",
                                 skip_tensors={"rope_factors_short.weight"})
    with pytest.raises(UserError, match="rope_factors_short.weight") as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)
    _, _, path = _model_and_file(tmp_path / "attn", "phi3_longrope",
                                 extra={"phi3.rope.scaling.attn_factor": 1.25})
    assert gguf_format.load_gguf_config(path).rope.param("attention_factor") == 1.25
    _, _, path = _model_and_file(tmp_path / "plain", "phi3_longrope", overrides=dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5}, sliding_window=None))
    config = gguf_format.load_gguf_config(path)  # Phi-3-mini-4k: no factors, no window
    assert (config.rope.rope_type, config.rope.dim, config.sliding_window) == ("default", 4, None)

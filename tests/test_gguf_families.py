"""GGUF files of Phi-2, Falcon and GPT-NeoX models (llama.cpp architectures phi2, falcon, gptneox).

Each tiny random transformers checkpoint is written to a GGUF file in float32 as llama.cpp's
convert_hf_to_gguf.py writes it (`convert`, following its Phi2Model, FalconModel and GPTNeoXModel:
names from gguf's tensor map, their metadata, Falcon's and GPT-NeoX's attn_qkv reordering), then
loaded with `load_gguf` and compared with the same checkpoint's Hugging Face folder: every
canonical tensor, the ModelConfig, and logits against transformers.

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
"""
import dataclasses
import json
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
from prunenet_jax.formats import gguf as gguf_format
from prunenet_jax.models import decoder, registry
from prunenet_jax.models.config import ModelConfig
from tests import tiny_models

ARCH = {"phi": gguf.MODEL_ARCH.PHI2, "falcon": gguf.MODEL_ARCH.FALCON,
        "gpt_neox": gguf.MODEL_ARCH.GPTNEOX}
WIDE = dict(intermediate_size=4 * tiny_models.BASE["hidden_size"])
# tiny_models entries and the overrides that make each one the converter writes exactly.
CASES = {
    "phi2": WIDE,
    "falcon_7b": WIDE,
    "falcon_new": WIDE,
    "neox_parallel": {},
    "neox_seq": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}),
}


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter (convert_hf_to_gguf.py, --outtype f32)


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that leaves out the metadata keys in `drop` (for files missing a fact)."""

    def __init__(self, path, arch, drop=()):
        self.drop = set(drop)
        super().__init__(str(path), arch)

    def add_key_value(self, key, val, vtype, sub_type=None):
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


METADATA = {"phi": _phi2_metadata, "falcon": _falcon_metadata, "gpt_neox": _neox_metadata}
MODIFY = {"phi": lambda name, data, hp: data, "falcon": _falcon_qkv, "gpt_neox": _neox_qkv}


def converter_hparams(folder):
    """config.json as the converter reads it. transformers writes num_kv_heads = heads for a
    multi-query Falcon too; the original checkpoints' config.json (tiiuae/falcon-7b) has none, so
    the converter reads n_head_kv = 1: we drop it to match them."""
    with open(os.path.join(folder, "config.json")) as f:
        hp = json.load(f)
    if hp["model_type"] == "falcon" and hp["multi_query"] and not hp["new_decoder_architecture"]:
        hp.pop("num_kv_heads", None)
    return hp


def convert(folder, path, drop=(), extra=None, fuse_phi_qkv=False):
    """The GGUF file convert_hf_to_gguf.py --outtype f32 writes for the checkpoint in `folder`:
    its metadata and tensors renamed by gguf's tensor map (plus a token list of the vocabulary
    size and bos/eos ids, as the vocab step does). `drop`: metadata keys left out; `extra`: keys
    added; `fuse_phi_qkv`: Phi-2's q/k/v written as one attn_qkv, as a `Wqkv` checkpoint gives."""
    hp = converter_hparams(folder)
    model_type, layers = hp["model_type"], hp["num_hidden_layers"]
    arch = ARCH[model_type]
    w = _Writer(path, gguf.MODEL_ARCH_NAMES[arch], drop)
    METADATA[model_type](w, hp, layers)
    for key, value in (extra or {}).items():
        w.add_float32(key, value)
    w.add_token_list([f"t{i}" for i in range(hp["vocab_size"])])
    w.add_bos_token_id(hp["bos_token_id"])
    w.add_eos_token_id(hp["eos_token_id"])
    names = gguf.get_tensor_name_map(arch, layers)
    tensors = {}
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


def _assert_same_tensors(ours, want):
    assert ours.globals.keys() == want.globals.keys()
    assert ours.layers.keys() == want.layers.keys()
    for name in want.globals:
        np.testing.assert_array_equal(ours.globals[name], want.globals[name], err_msg=name)
    for name in want.layers:
        np.testing.assert_array_equal(ours.layers[name], want.layers[name], err_msg=name)


def test_every_tensor_equals_the_hf_folders(case):
    name, _, folder, path, weights = case
    want = sources.load_model(folder)
    _assert_same_tensors(weights, want)
    assert weights.gguf_file == path and weights.hf_config["architectures"] == \
        want.hf_config["architectures"]
    # the scored matrix (fc1, ffn_up) read lazily as the method reads it
    config, stack = gguf_format.gguf_gate_stack(path)
    assert config == weights.config
    for i in range(config.num_hidden_layers):
        np.testing.assert_array_equal(stack[i], want.layers[registry.UP][i])


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
    assert "supported GGUF architectures: falcon, gptneox, llama, phi2, qwen2" in message
    assert "\n" not in message

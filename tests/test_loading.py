"""HF folder loading: sharded files, dtypes, and every bad input giving one clear UserError."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from prunenet_jax.models import registry
from tests import tiny_models


@pytest.fixture(scope="module")
def hf_model():
    return tiny_models.make_hf_model("llama_gqa_untied")


@pytest.fixture
def folder(tmp_path, hf_model):
    return tiny_models.save_hf_model(hf_model, tmp_path / "tiny-llama")


def _assert_same(a, b):
    assert a.config == b.config
    for group in ("globals", "layers"):
        x, y = getattr(a, group), getattr(b, group)
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_stacked_layout_matches_state_dict(folder, hf_model):
    w = sources.load_model(folder)
    sd = hf_model.state_dict()
    L, I, H = 3, 48, 32
    assert w.layers[registry.GATE].shape == (L, I, H)
    assert w.layers[registry.DOWN].shape == (L, H, I)
    for i in range(L):
        np.testing.assert_array_equal(w.layers[registry.GATE][i],
                                      sd[f"model.layers.{i}.mlp.gate_proj.weight"].numpy())
    np.testing.assert_array_equal(w.globals[registry.LM_HEAD], sd["lm_head.weight"].numpy())
    assert w.num_params() == sum(p.numel() for p in hf_model.parameters())


def test_sharded_folder_loads_identically(tmp_path, hf_model, folder):
    sharded = tiny_models.save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(files) >= 2 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    _assert_same(sources.load_model(sharded), sources.load_model(folder))


@pytest.mark.parametrize("torch_dtype,np_dtype", [(torch.bfloat16, ml_dtypes.bfloat16),
                                                  (torch.float16, np.float16)])
def test_half_precision_files(tmp_path, hf_model, torch_dtype, np_dtype):
    half = tiny_models.save_hf_model(hf_model.to(torch_dtype), tmp_path / "half")
    hf_model.float()
    stored = sources.load_model(half, dtype=None)
    assert stored.layers[registry.GATE].dtype == np_dtype
    as_f32 = sources.load_model(half)
    want = hf_model.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(as_f32.layers[registry.UP][1], want)
    _, gates = sources.load_gate_stack(half)  # what training streams to the devices: as stored
    assert gates.dtype == np_dtype and gates[1].dtype == np_dtype
    np.testing.assert_array_equal(np.asarray(gates[:], np.float32), as_f32.layers[registry.GATE])


def _raises(source, *fragments):
    with pytest.raises(UserError) as e:
        sources.load_model(str(source))
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope", "nope", "no such file or folder")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "config.json")


def test_unsupported_model_type(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    _raises(folder, "gpt2", "llama", "mistral", "qwen2")


def test_truncated_safetensors(folder):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _raises(folder, "model.safetensors", "truncated")


def test_garbage_safetensors(folder):
    open(os.path.join(folder, "model.safetensors"), "wb").write(b"not a safetensors file at all")
    _raises(folder, "model.safetensors", "truncated or not a safetensors file")


def test_config_shapes_disagree_with_weights(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["intermediate_size"] = 64
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    _raises(folder, "shape", "(48, 32)", "(64, 32)")


def test_config_with_fewer_layers_than_weights(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["num_hidden_layers"] = 2
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    _raises(folder, "model.layers.2", "num_hidden_layers")


def test_missing_shard(tmp_path, hf_model):
    sharded = tiny_models.save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(sharded, victim))
    _raises(sharded, victim, "missing")


def test_pickle_only_folder_is_refused(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").write(b"\x80")
    _raises(folder, "safetensors", "pickle")


def test_non_gguf_file(tmp_path):
    p = tmp_path / "weights.pt"
    p.write_bytes(b"x")
    _raises(p, "weights.pt", ".gguf")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _raises("no-such-org/no-such-model", "no-such-org/no-such-model", "hub")


def test_lazy_gate_stack_reads_only_the_layers_asked_for(folder):
    cfg, stack = sources.load_gate_stack(folder)
    full = sources.load_model(folder).layers[registry.GATE]
    assert cfg.intermediate_size == 48 and stack.shape == full.shape
    reads = []
    read = stack._read
    stack._read = lambda i: (reads.append(i), read(i))[1]
    np.testing.assert_array_equal(stack[1:3, :, :5], full[1:3, :, :5])
    assert reads == [1, 2]
    np.testing.assert_array_equal(np.asarray(stack), full)

"""Edge shapes through the whole launcher: a prime layer count on 8 devices, one layer, a prime
intermediate size, k < H, and a bf16 checkpoint that stays bf16 in the export."""
import json
import os

import pytest
import torch
import transformers

from tests import tiny_models
from tests.test_prune_launcher import _assert_same_run, _load, _run


@pytest.fixture(scope="module")
def bf16_prime(tmp_path_factory):
    # 13 layers (prime: 8 devices pad to 16), I = 37 (prime), H = 32; ratio 0.5 keeps 18 < H.
    model = tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=13, intermediate_size=37)
    return tiny_models.save_hf_model(model.to(torch.bfloat16),
                                     tmp_path_factory.mktemp("ckpt") / "bf16-prime")


def test_prime_layers_on_eight_devices_match_one_and_stay_bf16(bf16_prime, tmp_path):
    _run(bf16_prime, tmp_path / "one", 1)
    _run(bf16_prime, tmp_path / "eight", 8)
    one = _load(tmp_path / "one")
    _assert_same_run(one, _load(tmp_path / "eight"))
    manifest, kept = one[0], one[1]
    assert [e["kept"] for e in manifest["outputs"]] == [33, 18]  # int(0.9 * 37), int(0.5 * 37)
    assert kept[0.5].shape == (13, 18)
    folder = tmp_path / "one" / "ratio_0.5" / "hf"
    config = json.load(open(folder / "config.json"))
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[12].mlp.down_proj.weight.shape == (32, 18)


def test_single_layer_model_on_eight_devices(tmp_path):
    ckpt = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_tied", num_hidden_layers=1, intermediate_size=40),
        tmp_path / "one-layer")
    _run(ckpt, tmp_path / "out1", 1)
    _run(ckpt, tmp_path / "out8", 8)
    a, b = _load(tmp_path / "out1"), _load(tmp_path / "out8")
    _assert_same_run(a, b)
    assert a[1][0.5].shape == (1, 20)
    rewards = a[0]["training"]["episode_total_rewards"]
    assert len(rewards) == 3 and all(r > 0 for r in rewards)  # KS defined: finite, positive reward
    assert os.path.isfile(tmp_path / "out8" / "ratio_0.5" / "hf" / "model.safetensors")

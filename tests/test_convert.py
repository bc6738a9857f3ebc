"""launch.convert: orbax sliced model -> HF folder -> orbax, bit for bit, and its user errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prunenet_jax import prune
from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax import sources
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _convert(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "launch.convert", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def orbax_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_tied", num_hidden_layers=3, intermediate_size=40),
        root / "src")
    weights = sources.load_model(str(src), dtype=None)
    kept = np.sort(np.random.default_rng(0).permutation(40)[:13])[None].repeat(3, 0)
    sliced = prune.slice_weights(weights, kept)
    orbax_format.save_model(str(root / "orbax"), sliced, {"ratio": 0.675, "seed": 1}, kept=kept)
    return root, sliced


def _same(a, b):
    na, nb = dict(a.named_arrays()), dict(b.named_arrays())
    assert na.keys() == nb.keys()
    for n in na:
        assert na[n].dtype == nb[n].dtype
        np.testing.assert_array_equal(na[n], nb[n], err_msg=n)


def test_orbax_to_hf_to_orbax_round_trip(orbax_model):
    root, sliced = orbax_model
    proc = _convert("--input", root / "orbax", "--output", root / "hf")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["input_format"], result["output_format"]) == ("orbax", "hf")
    assert result["intermediate_size"] == 13
    hf = sources.load_model(str(root / "hf"), dtype=None)
    _same(sliced, hf)
    assert json.load(open(root / "hf" / "config.json"))["intermediate_size"] == 13
    card = open(root / "hf" / "README.md").read()
    assert "0.675" in card and "launch.convert" in card

    _convert("--input", root / "hf", "--output", root / "back")  # HF -> orbax by default
    _same(sliced, orbax_format.load_model(str(root / "back"), dtype=None))


def test_bf16_output_and_torch_format(orbax_model):
    root, _ = orbax_model
    _convert("--input", root / "orbax", "--output", root / "bf16", "--dtype=bfloat16", "--torch_format")
    config = json.load(open(root / "bf16" / "config.json"))
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert os.path.isfile(root / "bf16" / "pytorch_model.bin")


@pytest.mark.parametrize("args,fragment", [
    ([], "--input and --output are required"),
    (["--input=/no/such/folder", "--output={root}/x"], "/no/such/folder"),
    (["--input={root}/orbax", "--output={root}/orbax/inside"], "inside the input"),
    (["--input={root}/orbax", "--output={root}/src"], "--overwrite"),
    (["--input={root}/src", "--output={root}/x", "--torch_format"], "HF output only"),
    (["--input={root}/orbax", "--output={root}/x", "--dtype=int4"], "--dtype=int4"),
])
def test_user_errors(orbax_model, args, fragment):
    root, _ = orbax_model
    before = sorted(os.listdir(root))
    proc = _convert(*[a.format(root=root) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(root)) == before

"""The whole pipeline on the real default model (SmolLM2-135M GGUF): prune with --export_hf and
--torch_format, then transformers loads the export; batch pruning of three real checkpoints."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from prunenet_jax import prune
from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax.formats import hf_export
from prunenet_jax import sources
from prunenet_jax.models.config import ModelConfig
from tests.test_hf_export import _assert_close, _hf_load, _hf_logits, _our_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
SENTENCE = "Pruning keeps the spectrum of every gate matrix close to the original one."


def _launch(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smollm2"
    _launch("launch.prune", "--model=default", "--ratios=0.2", "--episodes=2", "--export_hf",
            "--torch_format", f"--out_dir={out}")
    return out, json.load(open(out / "manifest.json"))


def test_prune_export_loads_in_transformers_with_equal_logits(pruned_run):
    out, manifest = pruned_run
    (entry,) = manifest["outputs"]
    assert entry["kept"] == int(0.8 * 1536) and entry["hf_dir"] == "ratio_0.2/hf"
    sliced = orbax_format.load_model(str(out / entry["orbax_dir"]))
    exported = sources.load_model(str(out / entry["hf_dir"]))
    assert exported.hf_config["intermediate_size"] == entry["kept"]
    for (name, a), (name_b, b) in zip(sorted(sliced.named_arrays()), sorted(exported.named_arrays())):
        assert name == name_b
        np.testing.assert_array_equal(a, b, err_msg=name)  # our loader reads the export back

    model = _hf_load(out / entry["hf_dir"], dtype=torch.float32)  # asserts no missing/unexpected keys
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / entry["hf_dir"])
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids == sources.load_tokenizer(sliced)(SENTENCE)["input_ids"]  # the source's tokenizer
    got, want = _hf_logits(model, [ids]), _our_logits(sliced, [ids])
    # fp32 over 30 layers, logits up to ~25. Measured on this sentence: dense model 8.5e-5; this
    # policy-pruned model 9.6e-4 (transformers fp32 is 1.1e-4 from its own fp64 here, ours 1.0e-3:
    # our fp32 RMSNorm/RoPE round more on this model's larger activations). The export itself is
    # lossless: the loader check above is bit for bit.
    _assert_close(got, want, atol=2e-3)
    assert (got.argmax(-1) == want.argmax(-1)).all()

    card = open(out / entry["hf_dir"] / "README.md").read()
    for fragment in ("default", "0.2", "1228", manifest["policy_fingerprint"], "launch.prune"):
        assert fragment in card


def test_torch_format_loads_with_weights_only(pruned_run):
    out, manifest = pruned_run
    folder = out / manifest["outputs"][0]["hf_dir"]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1228, 576)


def test_batch_of_three_real_checkpoints_two_ratios(pruned_run, tmp_path):
    out, _ = pruned_run
    base = sources.load_model("default")
    copies = []
    for name, scale in (("scaled", 1.1), ("perturbed", None)):
        rng = np.random.default_rng(0)
        change = (lambda a: a * np.float32(scale)) if scale else (
            lambda a: a + np.float32(1e-3) * rng.standard_normal(a.shape, np.float32))
        modified = base.astype(np.float32)
        modified.layers = {n: change(a) for n, a in modified.layers.items()}
        copies.append(hf_export.export_hf(modified, str(tmp_path / name)))
    other = sources.load_model("default")
    other.layers = {n: a[:3] for n, a in other.layers.items()}  # another shape: 3 layers
    other.hf_config = {**other.hf_config, "num_hidden_layers": 3, "intermediate_size": 1536}
    other.config = ModelConfig.from_hf(other.hf_config)
    other = prune.slice_weights(other, np.tile(np.arange(1000), (3, 1)))  # I = 1000
    copies.append(hf_export.export_hf(other, str(tmp_path / "narrow")))

    batch_out = tmp_path / "batch"
    proc = _launch("launch.batch_prune", f"--checkpoints=default,{','.join(copies)}",
                   "--ratios=0.1,0.3", f"--policy={out / 'policy'}", f"--out_dir={batch_out}",
                   "--export_hf", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: narrow: ")]
    assert errors and "(1000, 576)" in errors[0] and "(1536, 576)" in errors[0]
    manifest = json.load(open(batch_out / "manifest.json"))
    done = [e for e in manifest["outputs"] if e["status"] == "done"]
    assert sorted((e["checkpoint"], e["ratio"]) for e in done) == [
        (n, r) for n in ("default", "perturbed", "scaled") for r in (0.1, 0.3)]
    for e in done:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            batch_out / e["hf_dir"], output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        assert model.config.intermediate_size == e["kept"] == int((1 - e["ratio"]) * 1536)

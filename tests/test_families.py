"""The families beyond LLaMA/Mistral/Qwen2 (OPT, Phi, Falcon, GPT-NeoX, Qwen3, Phi-3,
Gemma 2/3) end to end on tiny random checkpoints
(tests/tiny_models.py): logits against transformers on long padded batches; every pruning mode,
and the guard, with HF exports that transformers loads and that compute the dense model with the
dropped channels zeroed; a batch over two families; recovery (refit + LoRA) of a pruned output;
greedy generation against transformers' generate; and the configs we cannot compute refused by
the prune launcher with one `error:` line, exit code 2 and nothing written.

One dense folder and one prune run per config, shared by the module's tests (module fixtures)."""
import copy
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prunenet_jax import sources
from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax.method import calibration, episode
from prunenet_jax.models import decode, decoder
from prunenet_jax.recovery import job as recovery_job
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.recover import RecoverSpec
from prunenet_jax.run import batch, prune_run
from tests import tiny_models
from tests.test_user_errors import _assert_user_error, tree_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

# The tiny_models configs of the new families (each test runs on every one of them).
FAMILIES = ["opt", "opt_350m_postln", "phi2", "phi_qk_ln", "falcon_7b", "falcon_new",
            "falcon_seq_bias", "neox_parallel", "neox_seq", "qwen3_windowed", "phi3_longrope",
            "gemma2", "gemma3"]
BATCH = ("opt_350m_postln", "falcon_7b")  # two families of the same FFN shape (64 x 32): one policy
MODES = ("sample", "topk", "energy", "random")
RATIO = 0.25
CALIBRATION = calibration.Calibration(sequences=2, seq_len=16)
PLANTED = [5, 11, 30]  # channels made super channels (every layer) in the guard's model
PROMPTS = ([5, 17, 42, 8, 61], [3, 90, 14, 27, 33, 71, 9, 50, 12])
NEW_TOKENS = 10


# ----------------------------------------------------------------------------- helpers

def _model_type(name):
    return tiny_models.CONFIGS[name][0]


def _ffn(hf, i) -> dict:
    """Layer i's FFN modules of a transformers model, by role: up (fc1 / dense_h_to_4h /
    up_proj), down (fc2 / dense_4h_to_h / down_proj), gate (gated MLPs only)."""
    mt = hf.config.model_type
    if mt == "opt":
        layer = hf.model.decoder.layers[i]
        return {"up": layer.fc1, "down": layer.fc2}
    if mt == "phi":
        mlp = hf.model.layers[i].mlp
        return {"up": mlp.fc1, "down": mlp.fc2}
    if mt == "falcon":
        mlp = hf.transformer.h[i].mlp
        return {"up": mlp.dense_h_to_4h, "down": mlp.dense_4h_to_h}
    if mt == "gpt_neox":
        mlp = hf.gpt_neox.layers[i].mlp
        return {"up": mlp.dense_h_to_4h, "down": mlp.dense_4h_to_h}
    mlp = hf.model.layers[i].mlp
    if mt == "phi3":  # rows [gate | up] in one module
        return {"gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
    return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}  # llama, qwen2/3, ...


def _width(name) -> int:
    """The dense FFN width of a config."""
    mt, kwargs = tiny_models.config_kwargs(name)
    return kwargs[tiny_models.width_key(mt)]


def _kept_width(name) -> int:
    return int((1 - RATIO) * _width(name))


def _ours(folder):
    w = sources.load_model(str(folder))
    return w, decoder.from_named_arrays(w.config, w.named_arrays())


def _hf_load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def _hf_logits(model, tokens, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def _assert_close(got, want, valid=None, atol=1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    if valid is not None:
        got, want = got[valid], want[valid]
    diff = np.abs(got - want).max()
    assert diff < atol * max(1.0, np.abs(want).max() / 10), diff
    assert np.abs(want).max() > 0.1  # not a comparison between near-zero logits


def _tokens(shape=(2, 24), seed=1):
    return np.random.default_rng(seed).integers(0, tiny_models.BASE["vocab_size"], shape)


def _outputs(run_dir):
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    return {e["mode"]: e for e in manifest["outputs"]}


def _zeroed_dense(hf, kept) -> torch.nn.Module:
    """A copy of the dense transformers model with every channel not in kept[i] zeroed in layer
    i's down projection (what pruning those channels computes, the down bias kept whole)."""
    zeroed = copy.deepcopy(hf)
    with torch.no_grad():
        for i, keep in enumerate(kept):
            down = _ffn(zeroed, i)["down"].weight
            drop = np.setdiff1d(np.arange(down.shape[1]), keep)
            down[:, torch.tensor(drop)] = 0.0
    return zeroed


def _check_export(name, hf_dir, k, dense_hf=None, kept=None, orbax_dir=None, atol=1e-4):
    """The HF export at `hf_dir`: transformers loads it strictly; the family's width key and the
    FFN tensors are cut to k; its logits are ours on the same folder; with `dense_hf` and `kept`,
    also the dense model's with the dropped channels zeroed; with `orbax_dir`, it holds the orbax
    output's arrays."""
    mt = _model_type(name)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == mt
    key = tiny_models.width_key(mt)
    assert config[key] == k, (key, config.get(key), k)
    hf = _hf_load(hf_dir)
    assert getattr(hf.config, key) == k
    H = hf.config.hidden_size
    for i in range(hf.config.num_hidden_layers):
        ffn = _ffn(hf, i)
        for role, rows in (("gate", k), ("up", k), ("gate_up", 2 * k)):
            if role in ffn:
                assert tuple(ffn[role].weight.shape) == (rows, H), (role, i, ffn[role].weight.shape)
                if ffn[role].bias is not None:
                    assert tuple(ffn[role].bias.shape) == (rows,)
        assert tuple(ffn["down"].weight.shape) == (H, k), (i, ffn["down"].weight.shape)
        if ffn["down"].bias is not None:
            assert tuple(ffn["down"].bias.shape) == (H,)
    weights, ours = _ours(hf_dir)
    assert weights.config.intermediate_size == k
    tokens = _tokens()
    want = _hf_logits(hf, tokens)
    _assert_close(np.asarray(ours(jnp.asarray(tokens))), want, atol=atol)
    if dense_hf is not None:
        assert kept.shape == (hf.config.num_hidden_layers, k)
        _assert_close(want, _hf_logits(_zeroed_dense(dense_hf, kept), tokens), atol=atol)
    if orbax_dir is not None:
        a, b = dict(weights.named_arrays()), dict(sources.load_model(orbax_dir).named_arrays())
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    return hf, ours


def _prune(model, out_dir, modes=MODES, guard=False, policy=None):
    """launch.prune's job, in process: --mode=<modes> --ratios=0.25 --episodes=1 --export_hf."""
    return prune_run.run(prune_run.PruneJob(
        model=str(model), ratios=(RATIO,), policy=None if policy is None else str(policy),
        training=prune_run.Training(episode.TrainConfig(ratio=RATIO), episodes=1),
        outputs=prune_run.OutputOptions(modes=modes, export_hf=True, guard=guard),
        out_dir=str(out_dir), calibration=CALIBRATION), lambda: None)


# ----------------------------------------------------------------------------- shared models

class _Models:
    """Per config, made once: the dense transformers model and its folder, and a prune run."""

    def __init__(self, root):
        self.root, self._dense, self._runs = root, {}, {}

    def dense(self, name):
        if name not in self._dense:
            hf = tiny_models.make_hf_model(name)
            self._dense[name] = hf, tiny_models.save_hf_model(hf, self.root / name / "dense")
        return self._dense[name]

    def run(self, name):
        """The run folder of every mode at RATIO, with HF exports."""
        if name not in self._runs:
            out = self.root / name / "run"
            _prune(self.dense(name)[1], out)
            self._runs[name] = str(out)
        return self._runs[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _Models(tmp_path_factory.mktemp("families"))


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_long_padded_rows(models, name):
    """3 rows of 300 tokens (one left-padded, one right-padded), fp32, every real position."""
    hf, folder = models.dense(name)
    weights, ours = _ours(folder)
    assert weights.config.model_type == _model_type(name)
    assert weights.config.intermediate_size == _width(name)
    tokens = _tokens((3, 300), seed=2)
    mask = np.ones_like(tokens)
    mask[1, :45] = 0  # left padding
    mask[2, 260:] = 0  # right padding
    want = _hf_logits(hf, tokens, mask)
    got = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(mask)))
    _assert_close(got, want, valid=mask.astype(bool))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_mode_prunes_and_exports(models, name):
    run = models.run(name)
    hf, _ = models.dense(name)
    outputs = _outputs(run)
    assert sorted(outputs) == sorted(MODES)
    k = _kept_width(name)
    dense_params = sum(p.numel() for p in hf.parameters())
    for mode, entry in outputs.items():
        assert entry["status"] == "done" and entry["ratio"] == RATIO and entry["kept"] == k, entry
        assert entry["orbax_dir"] == f"{mode}/ratio_{RATIO}/orbax", entry
        assert entry["hf_dir"] == f"{mode}/ratio_{RATIO}/hf", entry
        orbax_dir, hf_dir = (os.path.join(run, entry[d]) for d in ("orbax_dir", "hf_dir"))
        kept = orbax_format.load_kept(orbax_dir)
        assert (np.diff(kept, axis=1) > 0).all() and kept.min() >= 0 and kept.max() < _width(name)
        pruned, _ = _check_export(name, hf_dir, k, dense_hf=hf, kept=kept, orbax_dir=orbax_dir)
        assert entry["params"] == sum(p.numel() for p in pruned.parameters()) < dense_params


def _planted(name, folder):
    """The config's dense model with the PLANTED channels of every layer scaled 4x in the up (and
    gate) rows and the down column: super channels by their weights (log of the norms' product
    more than 6 robust sigmas above the layer's median; a scale that keeps fp32 logits exact)."""
    hf = tiny_models.make_hf_model(name)
    with torch.no_grad():
        for i in range(hf.config.num_hidden_layers):
            ffn = _ffn(hf, i)
            width = ffn["down"].weight.shape[1]
            for role, rows in (("gate", PLANTED), ("up", PLANTED),
                               ("gate_up", PLANTED + [width + j for j in PLANTED])):
                if role in ffn:
                    ffn[role].weight[rows] *= 4.0
                    if ffn[role].bias is not None:
                        ffn[role].bias[rows] *= 4.0
            ffn["down"].weight[:, PLANTED] *= 4.0
    return hf, tiny_models.save_hf_model(hf, folder)


@pytest.mark.parametrize("name", FAMILIES)
def test_guard_keeps_a_super_channel_in_every_mode(models, name, tmp_path):
    hf, folder = _planted(name, tmp_path / "planted")
    run = tmp_path / "run"
    _prune(folder, run, guard=True, policy=os.path.join(models.run(name), "policy"))
    outputs = _outputs(run)
    assert sorted(outputs) == sorted(MODES)
    k = _kept_width(name)
    for mode, entry in outputs.items():
        assert entry["status"] == "done" and entry["kept"] == k and entry["guard"] is True, entry
        orbax_dir = os.path.join(run, entry["orbax_dir"])
        kept = orbax_format.load_kept(orbax_dir)
        assert all(set(PLANTED) <= set(row.tolist()) for row in kept), (mode, kept)
        # the planted channels carry 16-64x the others' output: fp32 rounding grows with it
        _check_export(name, os.path.join(run, entry["hf_dir"]), k, dense_hf=hf, kept=kept, atol=1e-3)


def test_batch_over_two_families(models, tmp_path):
    """One policy (trained on the first checkpoint) prunes both; each output exports."""
    folders = [models.dense(n)[1] for n in BATCH]
    out = tmp_path / "batch"
    result = batch.run(batch.BatchJob(
        checkpoints=tuple(folders), ratios=(RATIO,),
        training=prune_run.Training(episode.TrainConfig(ratio=RATIO), episodes=1),
        outputs=prune_run.OutputOptions(modes=("topk", "energy"), export_hf=True),
        out_dir=str(out), calibration=CALIBRATION), lambda: None)
    assert result.failure() is None, result.failure()
    manifest = json.load(open(out / "manifest.json"))
    entries = manifest["outputs"]
    assert len(entries) == 2 * len(BATCH)
    names = batch.output_names(folders)
    for name, item in zip(BATCH, names):
        hf, _ = models.dense(name)
        mine = [e for e in entries if e["checkpoint"] == item]
        assert sorted(e["mode"] for e in mine) == ["energy", "topk"]
        for e in mine:
            assert e["status"] == "done" and e["kept"] == _kept_width(name), e
            orbax_dir = str(out / e["orbax_dir"])
            _check_export(name, str(out / e["hf_dir"]), e["kept"], dense_hf=hf,
                          kept=orbax_format.load_kept(orbax_dir), orbax_dir=orbax_dir)


@pytest.mark.parametrize("name", FAMILIES)
def test_recovery_refits_trains_and_exports(models, name, tmp_path):
    run = models.run(name)
    pruned_dir = os.path.join(run, "topk", f"ratio_{RATIO}")
    out = tmp_path / "recovered"
    config = RecoverConfig(steps=2, seq_len=16, lora_rank=2, pool_rows=2, batch_size=1,
                           refit_rows=2, warmup=0)
    entries = recovery_job.run(recovery_job.RecoverJob(
        input=pruned_dir, out_dir=str(out), recovery=RecoverSpec(config, checkpoint_every=0),
        export_hf=True))
    assert len(entries) == 1
    entry = entries[0]
    k = _kept_width(name)
    assert entry.kept == k and entry.extra["recovery"]["steps"] == 2
    assert entry.extra["recovery"]["tokens_seen"] > 0
    assert entry.extra["recovery"]["refit"]["rows"] == 2
    hf_dir = str(out / entry.hf_dir)
    _check_export(name, hf_dir, k, orbax_dir=str(out / entry.orbax_dir))
    before = dict(sources.load_model(os.path.join(pruned_dir, "orbax")).named_arrays())
    after = dict(sources.load_model(hf_dir).named_arrays())
    assert before.keys() == after.keys()
    for changed in ("model.layers.0.mlp.down_proj.weight",  # the refit, then LoRA
                    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not np.allclose(before[changed], after[changed], atol=1e-7), changed
    assert np.array_equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def _greedy_equals_transformers(hf, ours):
    got = decode.generate(ours, [list(p) for p in PROMPTS], NEW_TOKENS)
    for prompt, out in zip(PROMPTS, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out == want, (prompt, out, want)
        assert len(out) == NEW_TOKENS


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_transformers(models, name):
    """Two prompts of different lengths, batched (left-padded) by us, each alone in transformers:
    the dense model, and the topk output's HF export."""
    hf, folder = models.dense(name)
    _greedy_equals_transformers(hf, _ours(folder)[1])
    hf_dir = os.path.join(models.run(name), "topk", f"ratio_{RATIO}", "hf")
    _greedy_equals_transformers(_hf_load(hf_dir), _ours(hf_dir)[1])


# ----------------------------------------------------------------------------- refused inputs

def _edit_config(folder, change):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    change(cfg)
    json.dump(cfg, open(path, "w"), indent=2)
    return folder


def _bad_models(root):
    """case -> (folder, what the error line must hold: each item a fragment, or a tuple of
    fragments one of which it holds, naming the model type or the feature; no folder's name
    holds one)."""
    def saved(name, folder, **overrides):
        return tiny_models.save_hf_model(tiny_models.make_hf_model(name, **overrides), root / folder)

    def hf_saved(model_type, folder, **kwargs):
        cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(0)
        return tiny_models.save_hf_model(transformers.AutoModelForCausalLM.from_config(cfg), root / folder)

    def rope(cfg):
        cfg["rope_parameters"]["rope_type"] = "not_a_rope"

    return {
        "mixtral": (hf_saved("mixtral", "sparse_ffn", vocab_size=97, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, num_local_experts=2, num_experts_per_tok=1),
                    [("mixtral", "mixture-of-experts", "num_local_experts")]),
        "bloom": (hf_saved("bloom", "other_family", vocab_size=97, hidden_size=32, n_layer=2, n_head=4),
                  ["bloom"]),
        "falcon_alibi": (saved("falcon_7b", "falcon_positions", alibi=True), ["alibi"]),
        "phi_act": (_edit_config(saved("phi2", "phi_act"), lambda c: c.update(hidden_act="not_an_act")),
                    ["not_an_act"]),
        "opt_act": (_edit_config(saved("opt", "opt_act"),
                                 lambda c: c.update(activation_function="not_an_act")), ["not_an_act"]),
        "falcon_act": (_edit_config(saved("falcon_new", "falcon_act"),
                                    lambda c: c.update(activation="not_an_act")), ["not_an_act"]),
        "neox_rope": (_edit_config(saved("neox_parallel", "neox_rope"), rope), ["not_a_rope"]),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_families")
    return root, _bad_models(root)


@pytest.mark.parametrize("case", ["mixtral", "bloom", "falcon_alibi", "phi_act", "opt_act",
                                  "falcon_act", "neox_rope"])
def test_unsupported_configs_are_refused(bad, case, tmp_path):
    root, cases = bad
    folder, fragments = cases[case]
    before = tree_hash(root)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "launch.prune", f"--model={folder}",
                           "--ratios=0.25", "--episodes=1", "--mode=sample,topk,energy,random",
                           f"--out_dir={out}", "--export_hf"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    last = _assert_user_error(proc)
    for wanted in fragments:
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        assert any(f in last for f in wanted), (wanted, last)
    assert os.path.basename(str(folder)) in last, last  # names the offending input
    assert not out.exists()
    assert tree_hash(root) == before

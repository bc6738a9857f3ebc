"""The energy mode: calibration, streamed channel statistics against a numpy forward, scores,
selection and the guard (in process); modes side by side, score reuse and bad inputs through the
launcher (subprocess) on a tiny model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.errors import UserError
from prunenet_jax.method import calibration, scores, statistics
from prunenet_jax.models import decoder, registry
from tests import tiny_models
from tests.test_report import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama (3 layers, I=48) with a tokenizer, and its weights."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), folder)
    save_tokenizer(folder)
    return str(folder), sources.load_model(str(folder))


# ----------------------------------------------------------------------------- numpy reference

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):
    """HF's rotate-half RoPE at positions 0..T-1 on x (T, heads, d)."""
    T, _, d = x.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def numpy_down_inputs(weights, tokens):
    """h = silu(gate x) * up x of every layer for one sequence, (L, T, I), by a numpy forward in
    float64 (MHA llama without biases)."""
    cfg, g = weights.config, {n: np.asarray(a, np.float64) for n, a in weights.named_arrays()}
    nh, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    x, T, hs = g["model.embed_tokens.weight"][tokens], len(tokens), []
    causal = np.tril(np.ones((T, T), bool))
    for l in range(cfg.num_hidden_layers):
        p = lambda n: g[f"model.layers.{l}.{n}"]
        a = _rms(x, p("input_layernorm.weight"), cfg.norm_eps)
        q, k, v = ((a @ p(f"self_attn.{n}_proj.weight").T).reshape(T, nh, d) for n in "qkv")
        q, k = _rope(q, cfg.rope.theta), _rope(k, cfg.rope.theta)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        att = np.where(causal[None], att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(T, -1) @ p("self_attn.o_proj.weight").T
        m = _rms(x, p("post_attention_layernorm.weight"), cfg.norm_eps)
        gate, up = m @ p("mlp.gate_proj.weight").T, m @ p("mlp.up_proj.weight").T
        h = gate / (1 + np.exp(-gate)) * up
        hs.append(h)
        x = x + h @ p("mlp.down_proj.weight").T
    return np.stack(hs)


def test_statistics_match_numpy_and_stream(tiny):
    _, weights = tiny
    tokens = np.random.default_rng(0).integers(0, weights.config.vocab_size, (5, 12)).astype(np.int32)
    h = np.concatenate([numpy_down_inputs(weights, t) for t in tokens], axis=1)  # (L, 5*12, I)
    want_mean_sq, want_peak = np.mean(h * h, axis=1), np.max(np.abs(h), axis=1)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    whole = statistics.collect(model, tokens, batch_size=5)
    streamed = statistics.collect(model, tokens, batch_size=2)  # 2 + 2 + 1 (padded) rows
    assert whole.tokens == streamed.tokens == 60
    for got in (whole, streamed):
        np.testing.assert_allclose(got.mean_sq, want_mean_sq, rtol=2e-4)
        np.testing.assert_allclose(got.peak, want_peak, rtol=2e-4)


def test_statistics_with_layers_sharded_over_devices(tiny):
    """On 8 simulated devices (a 3-layer model: the mesh of 3 splits its layers, 1 per device)."""
    folder, _ = tiny
    code = f"""
import numpy as np, jax
from prunenet_jax import sources
from prunenet_jax.method import sharding, statistics
from prunenet_jax.models import decoder
w = sources.load_model({folder!r})
model = decoder.from_named_arrays(w.config, w.named_arrays())
tokens = np.random.default_rng(0).integers(0, 97, (4, 10)).astype(np.int32)
one = statistics.collect(model, tokens, batch_size=2)
mesh = sharding.make_mesh(3)
sharded = statistics.shard_layers(model, mesh)
leaf = sharded.model.layers.mlp.gate_proj.weight[...]
assert len(leaf.sharding.device_set) == 3, leaf.sharding
split = statistics.collect(model, tokens, batch_size=2, mesh=mesh)
np.testing.assert_allclose(split.mean_sq, one.mean_sq, rtol=1e-5)
np.testing.assert_allclose(split.peak, one.peak, rtol=1e-5)
print("ok")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- calibration

def test_self_calibration_starts_at_bos_and_is_seeded(tiny):
    _, weights = tiny
    cal = calibration.Calibration(sequences=3, seq_len=9, seed=1)
    a = calibration.self_generated(weights, cal)
    assert a.shape == (3, 9) and a.dtype == np.int32
    assert (a[:, 0] == weights.hf_config["bos_token_id"]).all()
    np.testing.assert_array_equal(a, calibration.self_generated(weights, cal))
    assert not np.array_equal(a, calibration.self_generated(weights, calibration.Calibration(sequences=3, seq_len=9, seed=2)))
    assert len({tuple(r) for r in a}) > 1  # rows are drawn independently


def test_start_token_without_bos_is_seeded_uniform(tiny):
    import dataclasses

    _, weights = tiny
    no_bos = dataclasses.replace(weights, hf_config={**weights.hf_config, "bos_token_id": None})
    first = calibration.start_token(no_bos, lambda: None, seed=3)
    assert 0 <= first < weights.config.vocab_size
    assert first == calibration.start_token(no_bos, lambda: None, seed=3)


def test_calibration_tokens_saved_and_reused(tiny, tmp_path):
    _, weights = tiny
    cal = calibration.Calibration(sequences=2, seq_len=8, seed=0)
    tokens, reused = calibration.tokens_for(weights, cal, lambda: None, str(tmp_path))
    assert not reused and os.path.isfile(tmp_path / calibration.FILE)
    again, reused = calibration.tokens_for(weights, cal, lambda: None, str(tmp_path))
    assert reused
    np.testing.assert_array_equal(tokens, again)
    other, reused = calibration.tokens_for(weights, calibration.Calibration(sequences=2, seq_len=8, seed=1), lambda: None,
                                           str(tmp_path))
    assert not reused  # another seed: made again


def test_text_calibration_windows(tiny, tmp_path):
    folder, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    tok = sources.load_tokenizer(sources.load_model(folder))
    got = calibration.from_text(tok, calibration.Calibration(str(text), sequences=3, seq_len=10))
    ids = tok(text.read_text())["input_ids"]
    np.testing.assert_array_equal(got, np.asarray(ids[:30]).reshape(3, 10))
    with pytest.raises(UserError, match="does not exist; pass existing text files to --calibration"):
        calibration.Calibration(str(tmp_path / "missing.txt")).check()


# ----------------------------------------------------------------------------- scores, selection, guard

def test_energy_scores_and_selection():
    rng = np.random.default_rng(0)
    mean_sq, down = rng.random((2, 10)), rng.normal(size=(2, 4, 10))
    got = scores.energy(mean_sq, down)
    want = mean_sq * np.array([[np.sum(down[l, :, j] ** 2) for j in range(10)] for l in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    W = np.zeros((2, 10, 4), np.float32)
    kept = prune.select_channels(None, W, 4, "energy", None, scores=got)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-want, axis=1)[:, :4], axis=1))
    guard = np.zeros((2, 10), bool)
    guard[:, np.argmin(want[0])] = True  # the lowest-scoring channel of layer 0, guarded
    kept = prune.select_channels(None, W, 4, "energy", None, scores=got, guard=guard)
    assert np.argmin(want[0]) in kept[0]
    assert set(np.sort(np.argsort(-want[0])[:3])) <= set(kept[0])  # the rest: the best 3


def _planted(weights, layer, channel, factor=40.0):
    """`weights` with one channel's gate and up rows scaled up: a super channel."""
    import dataclasses

    layers = {n: a.copy() for n, a in weights.layers.items()}
    layers[registry.GATE][layer, channel] *= factor
    layers[registry.UP][layer, channel] *= factor
    return dataclasses.replace(weights, layers=layers)


def test_guard_finds_a_planted_super_channel_and_keeps_it(tiny):
    _, weights = tiny
    planted = _planted(weights, 1, 17)
    guard = scores.weight_guard(planted)
    assert guard.sum() == 1 and guard[1, 17]
    assert not scores.weight_guard(weights).any()
    W = planted.layers[registry.GATE]
    dropped = 0
    for seed in range(20):
        plain = prune.select_kept(None, W, 0.5, "random", seed)
        dropped += 17 not in plain[1]
        guarded = prune.select_kept(None, W, 0.5, "random", seed, guard=guard)
        assert 17 in guarded[1]
    assert dropped > 0  # unguarded random slicing drops it at some seeds
    # Without a guard the channels are exactly as before (the guard is off by default).
    np.testing.assert_array_equal(prune.select_kept(None, W, 0.5, "random", 3),
                                  prune.select_kept(None, W, 0.5, "random", 3, guard=None))


def test_energy_guard_adds_peak_outliers(tiny):
    _, weights = tiny
    L, I = 3, weights.config.intermediate_size
    peak = np.ones((L, I), np.float32) + 0.01 * np.arange(I)
    peak[2, 5] = 1e4
    s = scores.Scores(np.ones((L, I), np.float32), np.ones((L, I), np.float32), peak, {"shape": [L, I, 32]})
    g = s.guard(weights)
    assert g[2, 5] and g.sum() == 1


def test_robust_outliers_rule():
    x = np.array([[0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 100.0]])
    # median 0.5, MAD 1.5, sigma 2.2239: 100 is ~44.7 z above; nothing else is above 6
    assert robust_outliers_list(x) == [6]
    assert not scores.robust_outliers(np.zeros((1, 5))).any()  # MAD 0: no outliers


def robust_outliers_list(x):
    return list(np.nonzero(scores.robust_outliers(x)[0])[0])


def test_scores_saved_and_reused_without_a_forward_pass(tiny, tmp_path, monkeypatch):
    _, weights = tiny
    cal = calibration.Calibration(sequences=2, seq_len=8, seed=0)
    first, computed = scores.obtain(weights, cal, lambda: None, folder=str(tmp_path))
    assert computed and os.path.isdir(tmp_path / scores.SCORES)

    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(statistics, "collect", no_forward)
    monkeypatch.setattr(calibration, "self_generated", no_forward)
    again, computed = scores.obtain(weights, cal, lambda: None, folder=str(tmp_path))
    assert not computed
    np.testing.assert_array_equal(again.energy, first.energy)
    given, computed = scores.obtain(weights, cal, lambda: None, scores_path=str(tmp_path / scores.SCORES))
    assert not computed
    np.testing.assert_array_equal(given.peak, first.peak)


# ----------------------------------------------------------------------------- the launcher

def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "launch.prune", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(path)


def test_modes_side_by_side_then_reuse(tiny, text, tmp_path):
    folder, _ = tiny
    out = tmp_path / "run"
    common = [f"--model={folder}", "--episodes=1", f"--eval_text={text}", "--calibration_sequences=2",
              "--calibration_seq_len=16", f"--out_dir={out}"]
    proc = _run(*common, "--mode=sample,energy,random", "--guard", "--ratios=0.5", "--export_hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = lambda mode: open(out / mode / "ratio_0.5" / "hf" / "README.md").read()
    assert "forward passes of the dense model over 32 tokens the dense model generated itself" in card("energy")
    assert "no external data" in card("energy") and "no forward pass, no data" in card("sample")
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["mode"] == "sample,energy,random" and manifest["guard"] is True
    assert manifest["scores"]["computed"] is True and manifest["scores"]["tokens"] == 32
    assert set(manifest["random_baseline"]) == {"0.5"}
    assert 0 < manifest["dense_accuracy"] <= 1
    modes = [e["mode"] for e in manifest["outputs"]]
    assert modes == ["sample", "energy", "random"]
    for e in manifest["outputs"]:
        assert e["orbax_dir"] == f"{e['mode']}/ratio_0.5/orbax" and os.path.isdir(out / e["orbax_dir"])
        assert e["guard"] is True and e["kept"] == 24 and e["ppl"] > 1
        assert e["accuracy_retention"] == pytest.approx(e["accuracy"] / manifest["dense_accuracy"])
    energy = manifest["outputs"][1]
    assert energy["calibration"] == {"source": "self", "sequences": 2, "seq_len": 16, "seed": 42}
    assert energy["policy_fingerprint"] is None
    table = proc.stdout
    assert "energy +guard" in table and "random baseline (1 draw)" in table
    assert os.path.isfile(out / "calibration.npz") and os.path.isdir(out / "scores")

    # A new ratio in the same run: the saved scores serve it, no forward pass.
    proc = _run(*common, "--mode=sample,energy,random", "--guard", "--ratios=0.5,0.25", "--resume",
                "--export_hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["scores"]["computed"] is False
    assert len(manifest["outputs"]) == 6

    # --scores of that run in a new folder: energy alone trains no policy and runs no forward pass.
    other = tmp_path / "other"
    proc = _run(f"--model={folder}", "--mode=energy", "--ratios=0.5", f"--scores={out / 'scores'}",
                f"--out_dir={other}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["scores"]["computed"] is False and manifest["training"] is None
    assert not os.path.exists(other / "policy") and not os.path.exists(other / "calibration.npz")
    assert manifest["outputs"][0]["orbax_dir"] == "ratio_0.5/orbax"  # one mode: the usual layout
    from prunenet_jax.formats import orbax
    energy = scores.load(str(out / "scores")).energy
    np.testing.assert_array_equal(orbax.load_kept(str(other / "ratio_0.5/orbax")),
                                  np.sort(np.argsort(-energy, axis=1, kind="stable")[:, :24], axis=1))


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other") / "wide"
    tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied", intermediate_size=40), folder)
    out = tmp_path_factory.mktemp("other_run") / "run"
    proc = _run(f"--model={folder}", "--mode=energy", "--ratios=0.5", "--calibration_sequences=1",
                "--calibration_seq_len=8", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out / "scores")


@pytest.mark.parametrize("case", ["missing", "empty", "shape", "mode"])
def test_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path, other_shape, case):
    folder, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args, fragment = {
        "missing": (["--mode=energy", f"--calibration={tmp_path / 'missing.txt'}"], "missing.txt does not exist"),
        "empty": (["--mode=energy", f"--calibration={empty}"], "calibration text"),
        "shape": (["--mode=energy", f"--scores={other_shape}"], "I=40"),
        "mode": (["--mode=sample,best"], "unknown mode best"),
    }[case]
    out = tmp_path / "out"
    proc = _run(f"--model={folder}", "--ratios=0.5", "--episodes=1", f"--out_dir={out}", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    assert not out.exists()


def test_batch_prune_measures_scores_per_checkpoint(tiny, tmp_path):
    """energy in batch_prune: each checkpoint gets its own calibration and scores; no policy."""
    folder, _ = tiny
    second = tmp_path / "second"
    tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied", seed=1), second)
    out = tmp_path / "batch"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "launch.batch_prune", f"--checkpoints={folder},{second}",
            "--mode=energy,random", "--ratios=0.5", "--calibration_sequences=2",
            "--calibration_seq_len=8", f"--out_dir={out}"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(e["checkpoint"], e["mode"]) for e in summary["outputs"]] == [
        ("tiny-llama", "energy"), ("tiny-llama", "random"), ("second", "energy"), ("second", "random")]
    assert not os.path.exists(out / "policy")
    energy = {}
    for name in ("tiny-llama", "second"):
        assert os.path.isfile(out / name / "calibration.npz")
        energy[name] = scores.load(str(out / name / "scores")).energy
        assert os.path.isdir(out / name / "energy" / "ratio_0.5" / "orbax")
    assert not np.allclose(energy["tiny-llama"], energy["second"])  # measured per checkpoint
    # The same command again: the saved scores are reused (not measured and written again).
    stamp = lambda: [(os.stat(out / n / "scores").st_ino, os.stat(out / n / "scores").st_mtime_ns)
                     for n in energy]
    before = stamp()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stamp() == before


def test_report_lines_per_mode_and_continuations(tiny, tmp_path):
    """The report's ppl plot draws one line per mode plus the dense level; report.md shows every
    model's greedy continuation of the fixed prompt (from the sampler: the dense one is checked)."""
    from prunenet_jax.evaluation import measures, plots, tables
    from prunenet_jax.models import decode

    folder, weights = tiny
    tokenizer = sources.load_tokenizer(weights)
    text = measures.continuation(weights, tokenizer)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    ids = list(tokenizer(measures.PROMPT)["input_ids"])
    want = decode.generate(model, [ids], measures.CONTINUATION_TOKENS,
                            eos_ids=[weights.hf_config["eos_token_id"]])[0]
    assert text == tokenizer.decode(want, skip_special_tokens=True)
    row = lambda name, ratio, ppl, mode=None: {
        "name": name, "source": name, "ratio": ratio, "kept": 10, "params": 1, "ppl": ppl,
        "mean_ks": 0.0, "ks": [0.0], "mode": mode, "continuation": f"{name} says | hi\nthere"}
    models = [row("dense", 0.0, 10.0), row("s1", 0.1, 30.0, "sample"), row("s2", 0.2, 90.0, "sample"),
              row("e1", 0.1, 20.0, "energy"), row("e2", 0.2, 40.0, "energy")]
    md = tables.markdown({"models": models})
    assert f'## Greedy continuation of "{measures.PROMPT}"' in md
    assert "| e2 | e2 says \\| hi ⏎ there |" in md
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, **kw):
        ax = fig.axes[0]
        drawn["lines"] = {l.get_label(): list(zip(l.get_xdata(), l.get_ydata())) for l in ax.get_lines()}
        drawn["log"] = ax.get_yscale()
        return real_savefig(fig, path, **kw)

    import unittest.mock
    with unittest.mock.patch.object(plt.Figure, "savefig", capture):
        plots.plot_ppl(str(tmp_path / "p.png"), models, "t")
    assert drawn["log"] == "log" and os.path.isfile(tmp_path / "p.png")
    assert drawn["lines"]["sample"] == [(0.1, 30.0), (0.2, 90.0)]
    assert drawn["lines"]["energy"] == [(0.1, 20.0), (0.2, 40.0)]
    dense = [v for k, v in drawn["lines"].items() if k.startswith("dense")]
    assert len(dense) == 1 and {y for _, y in dense[0]} == {10.0}  # the horizontal dense level

"""The compensated mode (method/compensated.py): its moments against a numpy forward, its re-fitted
columns against the closed form, a lower output error than `energy` at equal width on rows it never
saw, the guard; then through launch.prune beside energy, exported to HF and loaded by transformers."""
import json

import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.method import calibration, compensated, compensation, scores, statistics
from prunenet_jax.models import decoder, registry
from tests import tiny_models
from tests.test_energy import _run, numpy_down_inputs, text, tiny  # noqa: F401  (fixtures)


def _self_tokens(weights, rows, seq_len, seed):
    return calibration.self_generated(weights, calibration.Calibration(
        sequences=rows, seq_len=seq_len, seed=seed))


def _logits(weights, tokens):
    return np.asarray(decoder.from_named_arrays(weights.config, weights.named_arrays())(tokens))


def test_first_layer_columns_are_the_closed_form_on_numpy_moments(tiny):
    """Layer 0 sees the dense inputs: its kept columns are the damped least-squares fit of the
    channel moments a numpy forward gives, for the candidate it reports."""
    _, weights = tiny
    tokens = _self_tokens(weights, 8, 12, seed=3)
    kept, columns, info = compensated.select(weights, tokens, 30)
    assert kept.shape == (3, 30) and columns.shape == (3, weights.config.hidden_size, 30)
    assert np.all(np.diff(kept, axis=1) > 0)
    assert info["rows"] == 8 and info["held_out_rows"] == 2 and len(info["layers"]) == 3
    G = sum(np.einsum("ti,tj->ij", h, h) for h in (numpy_down_inputs(weights, t)[0] for t in tokens))
    down = np.asarray(weights.layers[registry.COLUMN_SLICED][0], np.float64)
    damping = info["layers"][0]["damping"]
    want = (down[:, kept[0]] if damping is None else compensation.compensated_down(
        G + compensation.ridge_of(G, damping) * np.eye(len(G)), down, kept[0]))
    np.testing.assert_allclose(columns[0], want, rtol=2e-3, atol=2e-5)


def test_lower_output_error_than_energy_at_equal_width_on_unseen_rows(tiny):
    _, weights = tiny
    dense_model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    tokens = _self_tokens(weights, 16, 32, seed=0)
    fresh = _self_tokens(weights, 8, 32, seed=1)
    dense = _logits(weights, fresh)
    stats = statistics.collect(dense_model, tokens)
    energy = scores.energy(stats.mean_sq, weights.layers[registry.COLUMN_SLICED])
    W = weights.layers[registry.scored(weights.config)]
    for k in (36, 24):
        by_energy = prune.slice_weights(weights, prune.select_channels(None, W, k, "energy", None,
                                                                       scores=energy))
        kept, columns, info = compensated.select(weights, tokens, k)
        err = lambda w: float(np.mean((_logits(w, fresh) - dense) ** 2))
        assert err(prune.slice_weights(weights, kept, columns)) < err(by_energy), info["layers"]


def test_guarded_channels_are_kept(tiny):
    _, weights = tiny
    tokens = _self_tokens(weights, 8, 16, seed=0)
    free, _, _ = compensated.select(weights, tokens, 12)
    guard = np.zeros((3, weights.config.intermediate_size), bool)
    dropped = [int(np.setdiff1d(np.arange(guard.shape[1]), free[l])[0]) for l in range(3)]
    guard[np.arange(3), dropped] = True
    kept, _, _ = compensated.select(weights, tokens, 12, guard=guard)
    assert all(dropped[l] in kept[l] for l in range(3))


def test_launcher_side_by_side_with_energy_and_the_hf_export_loads(tiny, text, tmp_path):
    import torch
    import transformers

    folder, weights = tiny
    out = tmp_path / "run"
    proc = _run(f"--model={folder}", "--mode=energy,compensated", "--ratios=0.5", "--export_hf",
                "--guard", f"--eval_text={text}", "--calibration_sequences=4",
                "--calibration_seq_len=16", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    energy, comp = manifest["outputs"]
    assert comp["mode"] == "compensated" and comp["kept"] == 24 and comp["guard"] is True
    assert comp["calibration"] == energy["calibration"]  # one pool, sampled once, for both
    assert len(comp["compensation"]["layers"]) == 3 and comp["compensation"]["rows"] == 4
    assert "held-out rows of 64 tokens" in open(out / "compensated/ratio_0.5/hf/README.md").read()
    ours = sources.load_model(str(out / comp["orbax_dir"]))
    tokens = np.random.default_rng(0).integers(0, weights.config.vocab_size, (2, 10))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / comp["hf_dir"])).eval()
    with torch.no_grad():
        got = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, _logits(ours, tokens), atol=1e-4)
    # what was written: the re-fitted columns of the layers that chose a fit, else the dense ones
    from prunenet_jax.formats import orbax
    sliced = prune.slice_weights(weights, orbax.load_kept(str(out / comp["orbax_dir"])))
    for l, chosen in enumerate(comp["compensation"]["layers"]):
        same = np.array_equal(ours.layers[registry.COLUMN_SLICED][l],
                              sliced.layers[registry.COLUMN_SLICED][l])
        assert same == (chosen["damping"] is None), chosen


def test_one_calibration_row_is_refused_before_anything_runs(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "run"
    proc = _run(f"--model={folder}", "--mode=compensated", "--ratios=0.5",
                "--calibration_sequences=1", f"--out_dir={out}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--calibration_sequences=1: --mode=compensated holds calibration rows out" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_the_pool_the_scores_were_measured_on_is_walked_without_calibrating_again(tiny, monkeypatch):
    """Without a run folder nothing saves the pool between the scores and `compensated`: the
    tokens measured in this process are reused, not sampled a second time."""
    from prunenet_jax.run import prune_run

    _, weights = tiny
    cal = calibration.Calibration(sequences=4, seq_len=8, seed=5)
    measured = scores.measure(weights, cal, tokenizer_fn=lambda: None)
    assert measured.tokens.shape == (4, 8)
    calls = []
    real = calibration.tokens_for
    monkeypatch.setattr(calibration, "tokens_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert prune_run.calibration_tokens(weights, measured, cal, None)() is measured.tokens
    assert calls == []
    # scores loaded from a folder carry no tokens: calibrated again, the same tokens (same seed)
    loaded = scores.Scores(measured.energy, measured.mean_sq, measured.peak, measured.meta)
    again = prune_run.calibration_tokens(weights, loaded, cal, None)()
    assert calls == [1]
    np.testing.assert_array_equal(again, measured.tokens)

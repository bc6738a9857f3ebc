"""Recovery fine-tuning (prunenet_jax/recovery) on tiny random models: LoRA merging, one step
against a PyTorch reference step, bf16 compute, data parallel on 8 simulated devices."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from prunenet_jax import sources
from prunenet_jax.models import decoder
from prunenet_jax.recovery import data, lora, objectives, placement, teacher_cache
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.fine_tune import Recovery
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_NAMES = [f"{block}.{name}" for block, name in lora.TARGETS]


def _load(folder, scan=None):
    w = sources.load_model(str(folder))
    return w, decoder.from_named_arrays(w.config, w.named_arrays(), scan=scan)


def _tokens(vocab, rows=4, T=12, seed=1):
    tokens = np.random.default_rng(seed).integers(0, vocab, (rows, T)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 9:] = 0  # a row that ends early
    return tokens, mask


def _randomise_lora_b(rec, seed=3):
    """B starts at zero (training starts at the model); make it non-zero so A's gradient and the
    merge are exercised."""
    leaves, tree = jax.tree.flatten_with_path(rec.params)
    key = jax.random.key(seed)
    new = [0.05 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
           if "lora_b" in jax.tree_util.keystr(p) else v for i, (p, v) in enumerate(leaves)]
    rec.params = jax.tree.unflatten(tree, new)


@pytest.mark.parametrize("scan", [True, False])
def test_merged_lora_equals_unmerged_logits(tmp_path, scan):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), tmp_path / "m")
    _, model = _load(folder, scan=scan)
    rec = Recovery(model, None, RecoverConfig(objective="lm", lora_rank=4, remat=False))
    _randomise_lora_b(rec)
    tokens, mask = _tokens(97)
    unmerged = nnx.merge(rec.graphdef, rec.params, rec.frozen)
    assert any(isinstance(getattr(l.mlp, "gate_proj"), lora.LoraLinear)
               for l in lora._layers(unmerged))
    want = np.asarray(unmerged(jnp.asarray(tokens), jnp.asarray(mask)))
    merged = rec.merged_model()
    assert not any(isinstance(getattr(getattr(l, b), n), lora.LoraLinear)
                   for l in lora._layers(merged) for b, n in lora.TARGETS)
    got = np.asarray(merged(jnp.asarray(tokens), jnp.asarray(mask)))
    base = np.asarray(_load(folder, scan=scan)[1](jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
    assert np.abs(base - want).max() > 1e-2  # the adapters do change the model


def _torch_reference_step(student_hf, teacher_hf, tokens, mask, objective, lr, clip, wd,
                          lora_factors=None, scale=None):
    """One step in PyTorch: the mean per-target loss, clip_grad_norm_, torch.optim.AdamW. With
    lora_factors {hf weight name: (A, B)} only A, B train and W + scale B A is used."""
    t_tokens, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    base = dict(student_hf.named_parameters())
    if lora_factors is None:
        params = {n: p.detach().clone().requires_grad_(True) for n, p in base.items()}
        weights = lambda: params
        trainable = list(params.values())
    else:
        params = {n: (torch.tensor(np.asarray(a), requires_grad=True),
                      torch.tensor(np.asarray(b), requires_grad=True)) for n, (a, b) in lora_factors.items()}
        weights = lambda: {**{n: p.detach() for n, p in base.items()},
                           **{n: base[n].detach() + scale * b @ a for n, (a, b) in params.items()}}
        trainable = [t for ab in params.values() for t in ab]
    logits = torch.func.functional_call(student_hf, weights(), (t_tokens,),
                                        {"attention_mask": t_mask}).logits[:, :-1]
    valid = (t_mask[:, 1:] * t_mask[:, :-1]).float()
    log_q = torch.log_softmax(logits, -1)
    if objective == "distill":
        with torch.no_grad():
            t_logits = teacher_hf(t_tokens, attention_mask=t_mask).logits[:, :-1]
        log_p = torch.log_softmax(t_logits, -1)
        per = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        per = -log_q.gather(-1, t_tokens[:, 1:, None])[..., 0]
    loss = (per * valid).sum() / valid.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, clip)
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    opt.step()
    return float(loss.detach()), params


@pytest.mark.parametrize("method,objective", [("full", "lm"), ("lora", "distill")])
def test_one_step_equals_torch_reference(tmp_path, method, objective):
    student_hf = tiny_models.make_hf_model("llama_gqa_untied", seed=0)
    teacher_hf = tiny_models.make_hf_model("llama_gqa_untied", seed=1)
    s_dir = tiny_models.save_hf_model(student_hf, tmp_path / "s")
    t_dir = tiny_models.save_hf_model(teacher_hf, tmp_path / "t")
    _, student = _load(s_dir)
    _, teacher = _load(t_dir)
    cfg = RecoverConfig(steps=10, method=method, objective=objective, lr=1e-2, warmup=0,
                        clip_norm=0.5, weight_decay=0.1, batch_size=2, grad_accum=2,
                        lora_rank=4, lora_alpha=8.0)
    rec = Recovery(student, teacher, cfg)
    if method == "lora":
        _randomise_lora_b(rec)
    before = jax.tree.map(np.asarray, rec.params)
    tokens, mask = _tokens(97)
    out = rec.step(tokens, mask)
    after = jax.tree.map(np.asarray, rec.params)
    L = student_hf.config.num_hidden_layers
    if method == "lora":
        factors = {}
        for block, name in lora.TARGETS:
            node = before["model"]["layers"][block][name]
            for i in range(L):
                factors[f"model.layers.{i}.{block}.{name}.weight"] = (node["lora_a"][i], node["lora_b"][i])
        loss, ref = _torch_reference_step(student_hf, teacher_hf, tokens, mask, objective, cfg.lr,
                                          cfg.clip_norm, cfg.weight_decay, factors, 8.0 / 4)
        for block, name in lora.TARGETS:
            node = after["model"]["layers"][block][name]
            for i in range(L):
                a, b = ref[f"model.layers.{i}.{block}.{name}.weight"]
                np.testing.assert_allclose(node["lora_a"][i], a.detach().numpy(), atol=1e-5)  # 0.1% of the step (lr 1e-2)
                np.testing.assert_allclose(node["lora_b"][i], b.detach().numpy(), atol=1e-5)  # 0.1% of the step (lr 1e-2)
    else:
        loss, ref = _torch_reference_step(student_hf, teacher_hf, tokens, mask, objective, cfg.lr,
                                          cfg.clip_norm, cfg.weight_decay)
        got = decoder.named_arrays(nnx.merge(rec.graphdef, rec.params, rec.frozen))
        for name, want in ref.items():
            m = name.split(".")
            key = ".".join(m[3:]) if m[1] == "layers" else name
            value = got[key][int(m[2])] if m[1] == "layers" else got[key]
            np.testing.assert_allclose(value, want.detach().numpy(), atol=3e-5, err_msg=name)  # 0.3% of the step: float32 summation order differs by CPU (1.8e-5 on an Intel Xeon)
        moved = max(np.abs(got[".".join(n.split(".")[3:])][0] - before["model"]["layers"][
            n.split(".")[3]][n.split(".")[4]]["weight"][0]).max() for n in
            ["model.layers.0.mlp.gate_proj.weight"])
        assert moved > 1e-4  # the step did update the weights
    assert abs(float(out["loss"]) - loss) < 1e-5 * max(1.0, abs(loss))


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "m")
    tokens, mask = _tokens(97)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        _, model = _load(folder)
        rec = Recovery(model, None, RecoverConfig(
            objective="lm", lora_rank=4, compute_dtype=dtype, batch_size=4))
        losses[dtype] = float(rec.step(tokens, mask)["loss"])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(rec.params))
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"]
    assert losses["bfloat16"] != losses["float32"]  # the cast did happen


def test_step_rows_cover_each_epoch_once():
    seen = np.concatenate([data.step_rows(s, 3, 10, seed=7) for s in range(10)])  # 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:20])


def test_lora_rank_above_smallest_dimension_is_refused(tmp_path):
    from prunenet_jax.errors import UserError

    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), tmp_path / "m")
    _, model = _load(folder)
    with pytest.raises(UserError, match="--lora_rank=17 must be between 1 and 16"):
        lora.add_lora(model, 17, 8.0, 0)  # k/v: 2 heads x 8 = 16 rows


_DP_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, ".")
from prunenet_jax import sources
from prunenet_jax.models import decoder
from prunenet_jax.recovery import placement
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.fine_tune import Recovery
w = sources.load_model(sys.argv[1]); t = sources.load_model(sys.argv[2])
model = decoder.from_named_arrays(w.config, w.named_arrays())
teacher = decoder.from_named_arrays(t.config, t.named_arrays())
method, shard = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 4 else ("lora", "off")
cfg = RecoverConfig(steps=3, objective="distill", batch_size=8, grad_accum=2, lora_rank=4,
                    warmup=0, method=method, lr=1e-3 if method == "lora" else 1e-4)
rec = Recovery(model, teacher, cfg, placement.data_mesh(int(sys.argv[3])), shard)
rng = np.random.default_rng(0)
losses = []
for s in range(3):
    tokens = rng.integers(0, 97, (16, 12)).astype(np.int32)
    losses.append(float(rec.step(tokens, np.ones_like(tokens))["loss"]))
leaves = [np.asarray(x).tolist() for x in jax.tree.leaves(rec.params)]
# the share of each array one device holds, for the params, optimiser state and teacher
held = lambda t: [x.addressable_shards[0].data.size / x.size for x in jax.tree.leaves(t) if x.ndim]
print(json.dumps({"devices": jax.device_count(), "losses": losses, "params": leaves,
                  "held": {k: held(t) for k, t in (("params", rec.params), ("opt", rec.opt_state),
                                                   ("teacher", rec.teacher))}}))
"""


def test_data_parallel_loss_equals_one_device(tmp_path):
    s = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=0), tmp_path / "s")
    t = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=1), tmp_path / "t")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = {}
    for n in (1, 8):
        proc = subprocess.run([sys.executable, "-c", _DP_SCRIPT, s, t, str(n)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out[8]["devices"] == 8
    np.testing.assert_allclose(out[8]["losses"], out[1]["losses"], rtol=1e-5)
    # Adam divides by sqrt(v): a gradient element near zero, summed in another order over the
    # devices, can move by up to one step (lr 1e-3) per step, and did (1 of 384 by 5.6e-4 once).
    # So: nearly all elements within 10% of one step, none beyond the 3 steps taken.
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(out[8]["params"], out[1]["params"])])
    assert np.mean(diff <= 1e-4) >= 0.99 and diff.max() <= 3e-3, (np.mean(diff <= 1e-4), diff.max())


def test_fsdp_sharded_parameters_train_as_replicated_ones(tmp_path):
    """--shard_params=on, full fine-tune on 8 devices: every parameter, moment and teacher matrix
    is split 8 ways (each device holds 1/8), and the losses and parameters equal one device's."""
    s = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=0), tmp_path / "s")
    t = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=1), tmp_path / "t")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = {}
    for n, shard in ((1, "off"), (8, "on")):
        proc = subprocess.run([sys.executable, "-c", _DP_SCRIPT, s, t, str(n), "full", shard],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, shares in out[8]["held"].items():
        # the tiny config's arrays all have an axis of a multiple of 8 except the norms (width 64: fine)
        assert shares and all(x == 1 / 8 for x in shares), (name, shares)
    assert all(x == 1 for x in out[1]["held"]["params"])
    np.testing.assert_allclose(out[8]["losses"], out[1]["losses"], rtol=1e-5)
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(out[8]["params"], out[1]["params"])])
    assert np.mean(diff <= 1e-5) >= 0.99 and diff.max() <= 3e-4, (np.mean(diff <= 1e-5), diff.max())


def test_shard_params_auto_is_off_without_a_memory_limit():
    from jax.sharding import Mesh

    from prunenet_jax.errors import UserError

    mesh = Mesh(np.asarray(jax.devices()[:1]), (placement.DATA_AXIS,))  # CPU: no memory limit
    assert placement.should_shard("on", mesh, {}, {}, None) is True
    assert placement.should_shard("auto", mesh, {"w": np.zeros((8, 8))}, {}, None) is False
    with pytest.raises(UserError, match="--shard_params=sometimes is unknown"):
        placement.should_shard("sometimes", mesh, {}, {}, None)


def test_cached_teacher_topk_trains_as_the_live_teacher(tmp_path):
    """--teacher_cache=on with k = the vocabulary: the cached bf16 top-k gives the live teacher's
    loss (to bf16 rounding) and the same training; with a small k, only the top-k KL terms."""
    s = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=0), tmp_path / "s")
    t = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=1), tmp_path / "t")
    tokens, mask = _tokens(97)
    _, teacher = _load(t)
    logits = np.asarray(teacher(jnp.asarray(tokens), jnp.asarray(mask)))
    vals, ids = teacher_cache.pool_teacher_topk(teacher, tokens, mask, k=1000, batch=3)  # k clamped to V=97
    assert vals.shape == ids.shape == (4, 12, 97) and vals.dtype == jnp.bfloat16
    student_logits = np.asarray(_load(s)[1](jnp.asarray(tokens), jnp.asarray(mask)))
    live = float(objectives.distill_sum(student_logits, logits, mask))
    cached = float(objectives.distill_topk_sum(student_logits, vals, ids, mask))
    assert cached == pytest.approx(live, rel=1e-2) and cached != live  # bf16: close, not equal
    v8, i8 = teacher_cache.pool_teacher_topk(teacher, tokens, mask, k=8)
    np.testing.assert_array_equal(i8, np.argsort(-logits, axis=-1, kind="stable")[..., :8])

    losses, params = {}, {}
    for name in ("live", "cached"):
        cfg = RecoverConfig(objective="distill", method="full", lr=1e-4, warmup=0,
                            batch_size=4, teacher_cache="on" if name == "cached" else "off")
        _, model = _load(s)
        rec = Recovery(model, None if name == "cached" else _load(t)[1], cfg)
        losses[name] = [float(rec.step(tokens, mask, (vals, ids) if name == "cached" else ())["loss"])
                        for _ in range(3)]
        params[name] = jax.tree.leaves(rec.params)
    np.testing.assert_allclose(losses["cached"], losses["live"], rtol=1e-2)
    assert losses["live"][-1] < losses["live"][0]
    # Adam moves a near-zero gradient element by up to ~3 lr per step whatever its size, so a
    # bf16-sized change of such a gradient shows: 95% within 1e-5, none beyond 3 steps.
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(params["cached"], params["live"])])
    assert np.mean(diff <= 1e-5) >= 0.95 and diff.max() <= 1e-3, (np.mean(diff <= 1e-5), diff.max())


def test_teacher_cache_auto_is_off_on_cpu_and_bad_values_are_refused():
    cfg = RecoverConfig()
    assert teacher_cache.should_cache_teacher(cfg, 10**12, 10**12) is False  # CPU: no memory limit
    assert teacher_cache.should_cache_teacher(dataclasses.replace(cfg, teacher_cache="on"), 1, 1) is True
    assert teacher_cache.should_cache_teacher(dataclasses.replace(cfg, objective="lm", teacher_cache="on"),
                                              1, 1) is False
    from prunenet_jax.errors import UserError

    for bad, message in ((dict(teacher_cache="always"), "--teacher_cache=always is unknown"),
                         (dict(teacher_topk=0), "--teacher_topk=0 must be at least 1")):
        with pytest.raises(UserError, match=message):
            dataclasses.replace(cfg, **bad).check()

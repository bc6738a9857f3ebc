"""Recovery settings side by side on one pruned model: each setting refits (refit=true, the
default: its ppl is the curve's step 0) and trains from the same pruned weights on the same
distillation pool (sampled once from the dense model, saved, reused), and the perplexity on a
short eval text is measured at chosen steps, so one run gives each setting's curve. A screening
tool: confirm a chosen setting with launch.recover on the full eval text.

  python bench/recovery_sweep.py --pruned=<run>/ratio_0.2/orbax --pool=/tmp/pool.npz \
      --settings='refit_only:steps=0;lora_only:refit=false;both:lr=1e-3' \
      --steps=40 --eval_at=10,20,40 --out=bench/results/recovery_sweep.json

Times are wall seconds of training alone (the pool is sampled once, before; its time printed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from prunenet_jax import sources, special_tokens
from prunenet_jax import perplexity
from prunenet_jax.formats import texts
from prunenet_jax.models import decoder
from prunenet_jax.recovery import data, refit
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.fine_tune import Recovery
from prunenet_jax.recovery.recover import to_weights

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
flags.DEFINE_string("pruned", None, "The pruned model's orbax folder", required=True)
flags.DEFINE_string("dense", "default", "Its dense source")
flags.DEFINE_string("pool", None, "npz of the distillation pool (sampled and saved if missing)",
                    required=True)
flags.DEFINE_integer("pool_rows", 160, "Rows sampled into the pool")
flags.DEFINE_float("pool_temperature", 1.0, "Sampling temperature of the pool")
flags.DEFINE_float("pool_top_p", 1.0, "Nucleus of the pool's sampling")
flags.DEFINE_integer("seq_len", 256, "Tokens per pool row")
flags.DEFINE_string("settings", None, "name:key=value,...;... (RecoverConfig fields)", required=True)
flags.DEFINE_integer("steps", 40, "Steps of each setting (its schedule's length) unless it sets steps")
flags.DEFINE_list("eval_at", ["10", "20", "40"], "Steps after which the perplexity is measured")
flags.DEFINE_string("eval_text", TUTORIAL, "Eval text (path, glob)")
flags.DEFINE_integer("eval_tokens", 384, "Tokens per eval text file")
flags.DEFINE_float("refit_ridge", refit.RIDGE, "Ridge of the refit (settings with refit=true)")
flags.DEFINE_string("out", None, "JSON of the results (appended to when it exists)")
FLAGS = flags.FLAGS


def parse_settings(spec: str) -> list[tuple[str, dict]]:
    out = []
    for item in filter(None, spec.split(";")):
        name, _, body = item.partition(":")
        fields = {f.name: f.type for f in dataclasses.fields(RecoverConfig)}
        kv = {}
        for pair in filter(None, body.split(",")):
            k, v = pair.split("=")
            kind = fields[k] if isinstance(fields[k], str) else fields[k].__name__
            kv[k] = {"int": int, "float": float, "bool": lambda s: s == "true"}.get(kind, str)(v)
        out.append((name, kv))
    return out


def load_pool(dense, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if os.path.exists(FLAGS.pool):
        with np.load(FLAGS.pool, allow_pickle=False) as f:
            return f["tokens"], f["mask"]
    teacher = decoder.from_named_arrays(dense.config, dense.named_arrays())
    t0 = time.time()
    tokens, mask = data.generated_pool(teacher, special_tokens.bos_id(dense, lambda: tokenizer),
                                       special_tokens.eos_ids(dense, lambda: tokenizer),
                                       FLAGS.pool_rows, FLAGS.seq_len, seed=0,
                                       temperature=FLAGS.pool_temperature, top_p=FLAGS.pool_top_p)
    print(f"pool: {FLAGS.pool_rows} x {FLAGS.seq_len} sampled in {time.time() - t0:.1f} s", flush=True)
    np.savez(FLAGS.pool, tokens=tokens, mask=mask)
    return tokens, mask


def main(_):
    dense = sources.load_model(FLAGS.dense)
    pruned = sources.load_model(FLAGS.pruned)
    tokenizer = sources.load_tokenizer(dense)
    evaluate = perplexity.perplexity_fn(tokenizer, perplexity.EvalConfig(
        texts=texts.read_texts(FLAGS.eval_text, flag="--eval_text"), max_tokens=FLAGS.eval_tokens))
    tokens, mask = load_pool(dense, tokenizer)
    dense_ppl, before = evaluate(dense)["ppl"], evaluate(pruned)["ppl"]
    print(f"dense {dense_ppl:.3f}  pruned {before:.3f}", flush=True)
    eval_at = sorted(int(s) for s in FLAGS.eval_at)
    results = []
    for name, kv in parse_settings(FLAGS.settings):
        cfg = RecoverConfig(**{"steps": FLAGS.steps, "seq_len": FLAGS.seq_len, **kv})
        teacher = decoder.from_named_arrays(dense.config, dense.named_arrays())
        start, curve, losses, trained = pruned, [], [], 0.0
        if cfg.refit:
            rows = slice(0, cfg.refit_rows or None)
            start, info = refit.refit_down(pruned, teacher, tokens[rows], mask[rows],
                                           ridge=FLAGS.refit_ridge)
            ppl = evaluate(start)["ppl"]
            curve.append({"step": 0, "ppl": ppl, "excess_removed": (before - ppl) / (before - dense_ppl),
                          "refit_seconds": info["seconds"]})
            print(f"{name:>16} refit     ppl {ppl:8.3f}  removed {curve[-1]['excess_removed']:6.1%}  "
                  f"refit {info['seconds']:6.1f} s", flush=True)
        student = decoder.from_named_arrays(start.config, start.named_arrays())
        rec = Recovery(student, teacher, cfg)
        for step in range(cfg.steps):
            rows = data.step_rows(step, cfg.rows_per_step, len(tokens), cfg.seed)
            t0 = time.time()
            losses.append(float(rec.step(tokens[rows], mask[rows])["loss"]))
            trained += time.time() - t0
            if step + 1 in eval_at:
                ppl = evaluate(to_weights(rec.merged_model(), pruned))["ppl"]
                removed = (before - ppl) / (before - dense_ppl)
                curve.append({"step": step + 1, "ppl": ppl, "excess_removed": removed,
                              "train_seconds": round(trained, 1)})
                print(f"{name:>16} step {step + 1:>4}  ppl {ppl:8.3f}  removed {removed:6.1%}  "
                      f"train {trained:6.1f} s  loss(last 5) {np.mean(losses[-5:]):.4f}", flush=True)
        results.append({"name": name, "config": dataclasses.asdict(cfg), "curve": curve,
                        "losses": [round(l, 5) for l in losses]})
    if FLAGS.out:
        old = json.load(open(FLAGS.out)) if os.path.exists(FLAGS.out) else []
        old.append({"pruned": FLAGS.pruned, "dense_ppl": dense_ppl, "ppl_before": before,
                    "eval": {"text": FLAGS.eval_text, "tokens_per_file": FLAGS.eval_tokens},
                    "pool": [int(tokens.shape[0]), int(tokens.shape[1])], "results": results})
        with open(FLAGS.out + ".tmp", "w") as f:
            json.dump(old, f, indent=1)
        os.replace(FLAGS.out + ".tmp", FLAGS.out)


if __name__ == "__main__":
    app.run(main)

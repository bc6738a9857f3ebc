"""Quality of the channel selection modes, as distributions over seeds, on the default model.

Methods (each pruned at every ratio, scored by one evaluator: perplexity and top-1 next-token
accuracy on the Python tutorial text, first 16,384 tokens, windows of 512):
  sample, sample+guard   PruneNet: one policy (seed 42, 20 episodes, trained at --train_ratio),
                         then one sampling seed per run
  random, random+guard   uniform random slicing, one seed per run
  energy                 self-calibrated energy (method/scores.py), one CALIBRATION seed per run
                         (tokens sampled from the dense model with that seed)
  energy_text            energy calibrated on another text (--user_text; not the evaluation text)
  topk                   the policy's top-k (deterministic, once)
Seeds run in the outer loop and every method at every ratio inside it, and the JSON is rewritten
after every model, so a run cut short still has balanced partial results. Slicing a 135M model is
brittle: report the median and range, never the arithmetic mean of ppl.

  python bench/quality.py --out=bench/results/quality_modes.json

`--study` instead runs the calibration size study: energy with self-generated calibration of
several sizes (--study_sizes, N x T), the time of sampling and of the statistics, and the ppl at
--ratios (on --study_eval_tokens tokens of the tutorial).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax import prune, sources  # noqa: E402
from prunenet_jax import perplexity
from prunenet_jax.formats import texts
from prunenet_jax.method import calibration, episode, sampling, scores, trainer
from prunenet_jax.models import registry  # noqa: E402

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
USER_TEXT = "/usr/share/doc/python3.11/html/_sources/howto/*.rst.txt"
METHODS = ("energy", "random", "random+guard", "sample", "sample+guard", "energy_text", "topk")


def summarize(values: list) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    med = float(np.median(values))
    return {"n": len(values), "median": med, "min": float(min(values)), "max": float(max(values)),
            "max_over_median": float(max(values)) / med,
            "geomean": float(math.exp(np.mean(np.log(finite)))) if finite else None,
            "values": values}


def write(path: str, data: dict) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)


def energy_scores(weights, tokenizer, source: str, seed: int, sequences: int, seq_len: int):
    cal = calibration.Calibration(source, sequences, seq_len, seed)
    s = scores.measure(weights, cal, lambda: tokenizer)
    return s, s.meta["seconds"]


def run_study(args, weights, tokenizer, measure) -> None:
    data = {"dense": measure(weights), "eval_tokens": args.study_eval_tokens, "sizes": []}
    for spec in args.study_sizes.split(","):
        n, t = (int(x) for x in spec.split("x"))
        for seed in [int(s) for s in args.study_seeds.split(",")]:
            s, seconds = energy_scores(weights, tokenizer, calibration.SELF, seed, n, t)
            row = {"sequences": n, "seq_len": t, "tokens": n * t, "seed": seed, "seconds": seconds,
                   "ppl": {}, "accuracy": {}}
            for r in args.ratios_list:
                scored = weights.layers[registry.scored(weights.config)]
                kept = prune.select_kept(None, scored, r, "energy", 0, scores=s.energy)
                m = measure(prune.slice_weights(weights, kept))
                row["ppl"][str(r)], row["accuracy"][str(r)] = m["ppl"], m["accuracy"]
            data["sizes"].append(row)
            print(json.dumps(row), flush=True)
            write(args.out, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--eval_text", default=TUTORIAL)
    ap.add_argument("--user_text", default=USER_TEXT, help="energy_text's calibration text")
    ap.add_argument("--max_tokens", type=int, default=16384)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ratios", default="0.3,0.2,0.1")
    ap.add_argument("--train_ratio", type=float, default=0.3)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sequences", type=int, default=calibration.Calibration.sequences)
    ap.add_argument("--calibration_seq_len", type=int, default=calibration.Calibration.seq_len)
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--study_sizes", default="4x128,8x128,16x128,32x128,64x128,4x512")
    ap.add_argument("--study_seeds", default="0")
    ap.add_argument("--study_eval_tokens", type=int, default=4096)
    ap.add_argument("--out", default=None, help="write the JSON here (rewritten after every model)")
    ap.add_argument("--summarize", default=None, help="only summarize this JSON (e.g. of a run cut short)")
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            return finish(json.load(f), args.summarize)
    args.ratios_list = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]

    weights = sources.load_model(args.model)
    tokenizer = sources.load_tokenizer(weights)
    W = weights.layers[registry.scored(weights.config)]
    evaluate = perplexity.perplexity_fn(tokenizer, perplexity.EvalConfig(
        texts.read_texts(args.eval_text), seq_len=args.seq_len, batch_size=args.batch_size,
        max_tokens=args.study_eval_tokens if args.study else args.max_tokens))
    measure = lambda w: {k: evaluate(w)[k] for k in ("ppl", "accuracy")}
    if args.study:
        return run_study(args, weights, tokenizer, measure)

    data = {"dense": measure(weights), "eval_text": args.eval_text, "max_tokens": args.max_tokens,
            "calibration": {"sequences": args.sequences, "seq_len": args.calibration_seq_len,
                            "user_text": args.user_text},
            "timings": {}, "runs": {}}
    print(f"dense: {data['dense']}", flush=True)
    best = None
    if any(m.startswith("sample") or m == "topk" for m in methods):
        t0 = time.time()
        result = trainer.train(W, episode.TrainConfig(ratio=args.train_ratio), seed=args.seed,
                             num_episodes=args.episodes)
        best = jax.tree.map(np.asarray, result.state.best_params)
        data["timings"]["train_20_episodes_s"] = time.time() - t0
        print(f"trained {args.episodes} episodes in {time.time() - t0:.1f}s", flush=True)
    guard = scores.weight_guard(weights)
    data["weight_guard_channels"] = int(guard.sum())
    text_scores = None

    def record(method: str, r: float, seed, kept) -> None:
        m = measure(prune.slice_weights(weights, kept))
        m["accuracy_retention"] = m["accuracy"] / data["dense"]["accuracy"]
        data["runs"].setdefault(method, {}).setdefault(str(r), []).append({"seed": seed, **m})
        print(f"{method:>13} ratio {r} seed {seed}: ppl {m['ppl']:.2f} acc {m['accuracy']:.4f}", flush=True)
        write(args.out, data)

    for seed in seeds:
        energy = None
        if "energy" in methods:
            energy, seconds = energy_scores(weights, tokenizer, calibration.SELF, seed,
                                            args.sequences, args.calibration_seq_len)
            data["timings"].setdefault("energy_self", []).append({"seed": seed, **seconds})
            data.setdefault("energy_guard_channels", []).append(int(energy.guard(weights).sum()))
        if "energy_text" in methods and text_scores is None:
            text_scores, seconds = energy_scores(weights, tokenizer, args.user_text, 0,
                                                 args.sequences, args.calibration_seq_len)
            data["timings"]["energy_text"] = seconds
        for r in args.ratios_list:
            k = sampling.num_kept(weights.config.intermediate_size, r)
            key = lambda s: jax.random.key(s)
            for method in methods:
                if method == "energy":
                    record(method, r, seed, prune.select_channels(None, W, k, "energy", None,
                                                                  scores=energy.energy))
                elif method == "energy_text" and seed == seeds[0]:
                    record(method, r, None, prune.select_channels(None, W, k, "energy", None,
                                                                  scores=text_scores.energy))
                elif method == "topk" and seed == seeds[0]:
                    record(method, r, None, prune.select_channels(best, W, k, "topk", key(0)))
                elif method in ("random", "random+guard"):
                    g = guard if method.endswith("guard") else None
                    record(method, r, seed, prune.select_channels(None, W, k, "random",
                                                                  key(1000 + seed), guard=g))
                elif method in ("sample", "sample+guard"):
                    g = guard if method.endswith("guard") else None
                    record(method, r, seed, prune.select_channels(best, W, k, "sample", key(seed),
                                                                  guard=g))

    finish(data, args.out)


def finish(data: dict, out: str) -> None:
    """Adds the summary (median, range, max/median per method and ratio) and prints the table."""
    data["summary"] = {m: {r: {"ppl": summarize([x["ppl"] for x in runs]),
                               "accuracy_retention": summarize([x["accuracy_retention"] for x in runs])}
                           for r, runs in by_ratio.items()} for m, by_ratio in data["runs"].items()}
    write(out, data)
    print(f"\ndense ppl {data['dense']['ppl']:.2f}, accuracy {data['dense']['accuracy']:.4f}\n")
    print(f"{'method':>13}  {'ratio':>5}  {'n':>2}  {'median':>9}  {'range':>22}  {'max/med':>7}  {'acc kept':>8}")
    for method, by_ratio in data["summary"].items():
        for r, s in sorted(by_ratio.items()):
            p, a = s["ppl"], s["accuracy_retention"]
            print(f"{method:>13}  {r:>5}  {p['n']:>2}  {p['median']:>9.1f}  {p['min']:>10.1f}..{p['max']:<10.1f}"
                  f"  {p['max_over_median']:>7.2f}  {100 * a['median']:>7.1f}%")


if __name__ == "__main__":
    main()

"""Compensation-aware selection (method/compensated.py) against `energy`, `energy` + the closed-form
refit (recovery/refit.py) and random slicing, on held-out real text, from one self-generated
calibration pool per seed (no external data anywhere in the choices).

Each method prunes the default model at each ratio from the same pool; perplexity and top-1
accuracy are measured on two texts the choices never saw: the Python tutorial and the Python
HOWTOs (both in Debian's python3.11-doc), their first --eval_tokens tokens in windows of 512.

  python bench/compensation_study.py --out=bench/results/compensation_study.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax import perplexity, prune, sources  # noqa: E402
from prunenet_jax.formats import texts  # noqa: E402
from prunenet_jax.method import calibration, compensated, sampling, scores, statistics  # noqa: E402
from prunenet_jax.models import decoder, registry  # noqa: E402
from prunenet_jax.recovery import refit  # noqa: E402

TEXTS = {"tutorial": "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt",
         "howto": "/usr/share/doc/python3.11/html/_sources/howto/*.rst.txt"}
METHODS = ("energy", "energy+refit", "compensated", "random")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prune_with(method, weights, dense_model, tokens, k, seed, stats, dampings):
    """The pruned weights of one method, and what it records."""
    W = weights.layers[registry.scored(weights.config)]
    if method == "random":
        kept = prune.select_channels(None, W, k, "random", jax.random.key(1000 + seed))
        return prune.slice_weights(weights, kept), {}
    if method.startswith("energy"):
        energy = scores.energy(stats.mean_sq, weights.layers[registry.COLUMN_SLICED])
        pruned = prune.slice_weights(weights, prune.select_channels(None, W, k, "energy", None,
                                                                    scores=energy))
        if method == "energy+refit":
            pruned, info = refit.refit_down(pruned, dense_model, tokens, np.ones_like(tokens))
            return pruned, {"refit_seconds": info["seconds"]}
        return pruned, {}
    kept, columns, info = compensated.select(weights, tokens, k, dampings=dampings)
    chosen = [(c["candidate"], c["damping"]) for c in info["layers"]]
    return prune.slice_weights(weights, kept, columns), {
        "chosen": {f"{n}@{d}": chosen.count((n, d)) for n, d in sorted(set(chosen), key=str)}}


def table(data: dict) -> str:
    """Per method and ratio: the median (min..max over seeds) ppl on each text, its multiple of
    dense, top-1 accuracy retained, and the median seconds of the selection."""
    lines = [f"dense: " + ", ".join(f"{t} ppl {d['ppl']:.2f} top-1 {d['accuracy']:.4f}"
                                    for t, d in data["dense"].items())]
    lines.append(f"{'ratio':>5}  {'method':<13} {'n':>2}  " + "  ".join(
        f"{t + ' ppl (range)':>24} {'x dense':>7} {'top-1':>6}" for t in data["dense"])
        + f"  {'seconds':>7}")
    groups = {}
    for row in data["runs"]:
        groups.setdefault((row["ratio"], row["method"]), []).append(row)
    for (r, method), rows in sorted(groups.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]))):
        cells = []
        for t, d in data["dense"].items():
            ppl = [x[t]["ppl"] for x in rows]
            acc = np.median([x[t]["accuracy"] for x in rows]) / d["accuracy"]
            cells.append(f"{np.median(ppl):>9.2f} ({min(ppl):.1f}..{max(ppl):.1f})".rjust(24)
                         + f" {np.median(ppl) / d['ppl']:>7.2f} {acc:>6.1%}")
        lines.append(f"{r:>5}  {method:<13} {len(rows):>2}  " + "  ".join(cells)
                     + f"  {np.median([x['seconds'] for x in rows]):>7.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--eval_tokens", type=int, default=4096)
    ap.add_argument("--dampings", default=",".join(map(str, compensated.DAMPINGS)))
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, help="only print the table of this JSON")
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            return print(table(json.load(f)))
    weights = sources.load_model(args.model)
    tokenizer = sources.load_tokenizer(weights)
    evals = {name: perplexity.perplexity_fn(tokenizer, perplexity.EvalConfig(
        {name: "".join(texts.read_texts(glob).values())}, seq_len=512, batch_size=8,
        max_tokens=args.eval_tokens)) for name, glob in TEXTS.items()}

    def measure(w):
        out = {}
        for name, f in evals.items():
            result = f(w)
            out[name] = {k: round(float(result[k]), 4) for k in ("ppl", "accuracy")}
        return out

    dense_model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    data = {"model": args.model, "pool": f"{args.sequences}x{args.seq_len} self-generated",
            "eval_tokens": args.eval_tokens, "dense": measure(weights), "runs": []}
    print("dense", json.dumps(data["dense"]), flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.time()
        cal = calibration.Calibration(sequences=args.sequences, seq_len=args.seq_len, seed=seed)
        tokens = calibration.self_generated(weights, cal, lambda: tokenizer, dense_model)
        sampled = time.time() - t0
        stats = statistics.collect(dense_model, tokens)
        for r in [float(x) for x in args.ratios.split(",")]:
            k = sampling.num_kept(weights.config.intermediate_size, r)
            for method in args.methods.split(","):
                t0 = time.time()
                pruned, extra = prune_with(method, weights, dense_model, tokens, k, seed, stats,
                                           [float(d) for d in args.dampings.split(",")])
                row = {"seed": seed, "ratio": r, "method": method, "seconds": round(time.time() - t0, 1),
                       "sampling_seconds": round(sampled, 1), **measure(pruned), **extra,
                       "peak_rss_gb": round(peak_rss_gb(), 2)}
                data["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out + ".tmp", "w") as f:
                        json.dump(data, f, indent=1)
                    os.replace(args.out + ".tmp", args.out)
    print(table(data))


if __name__ == "__main__":
    main()

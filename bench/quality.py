"""Quality of the slicing, as distributions over sampling seeds: ours vs the reference vs random.

Trains one policy (seed 42, 20 episodes, at --train_ratio), then for each ratio prunes the default
model with 5 sampling seeds (`sample`), once with `topk`, and with 5 uniform random slicings, and
measures perplexity on the Python tutorial text (first 16,384 tokens, windows of 512). The
reference's kept channels (same ratios, 5 seeds, and top-k by its alpha) come from an .npz written
by `bench/reference/time_reference.py prune` in the reference's own venv; every model, ours or
theirs, is scored by the same evaluator. Slicing a 135M model is brittle, so report the median and
range (and geometric mean), never the arithmetic mean of ppl.

  /work/refvenv/bin/python bench/reference/time_reference.py prune --episodes 20 \
      --ratios 0.1,0.2,0.3 --sample-seeds 0,1,2,3,4 --out /work/refdata/ref_prune_indices.npz
  .venv/bin/python bench/quality.py --reference_indices=/work/refdata/ref_prune_indices.npz
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

from prunenet_jax import prune  # noqa: E402
from prunenet_jax.evaluation import perplexity  # noqa: E402
from prunenet_jax import sources  # noqa: E402
from prunenet_jax.method import sampling  # noqa: E402
from prunenet_jax.evaluation import texts  # noqa: E402
from prunenet_jax.method import train  # noqa: E402
from prunenet_jax.models import registry  # noqa: E402

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--eval_text", default=TUTORIAL)
    ap.add_argument("--max_tokens", type=int, default=16384)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--train_ratio", type=float, default=0.3)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sample_seeds", default="0,1,2,3,4")
    ap.add_argument("--reference_indices", default=None, help=".npz from time_reference.py prune")
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.sample_seeds.split(",")]

    weights = sources.load_model(args.model)
    tokenizer = sources.load_tokenizer(weights)
    eval_texts = texts.read_texts(args.eval_text)
    W = weights.layers[registry.GATE]

    measure = perplexity.perplexity_fn(tokenizer, perplexity.EvalConfig(
        eval_texts, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens))
    ppl = lambda w: measure(w)["ppl"]

    t0 = time.time()
    result = train.train(W, train.TrainConfig(ratio=args.train_ratio), seed=args.seed,
                         num_episodes=args.episodes)
    best = jax.tree.map(np.asarray, result.state.best_params)
    totals = [float(m.total_reward) for m in result.history]
    print(f"trained {args.episodes} episodes in {time.time() - t0:.0f}s; total reward per episode "
          f"{min(totals):.2f}..{max(totals):.2f}, best episode {int(result.state.best_episode)}",
          flush=True)

    ref = np.load(args.reference_indices) if args.reference_indices else None
    runs = {"dense": {"-": [ppl(weights)]}}
    for r in ratios:
        k = sampling.num_kept(weights.config.intermediate_size, r)
        choices = {
            "ours sample": [prune.select_channels(best, W, k, "sample", jax.random.key(s)) for s in seeds],
            "ours topk": [prune.select_channels(best, W, k, "topk", jax.random.key(0))],
            "uniform random": [prune.select_channels(best, W, k, "random", jax.random.key(1000 + s))
                               for s in seeds],
        }
        if ref is not None:
            choices["reference sample"] = [ref[f"idx_r{r}_s{s}"] for s in seeds]
            choices["reference topk"] = [ref[f"topk_r{r}"]]
        for method, index_sets in choices.items():
            values = [ppl(prune.slice_weights(weights, idx)) for idx in index_sets]
            runs.setdefault(method, {})[str(r)] = values
            print(f"ratio {r} {method:>16}: " + ", ".join(f"{v:.1f}" for v in values), flush=True)

    summary = {"dense_ppl": runs.pop("dense")["-"][0], "episode_total_rewards": totals,
               "best_episode": int(result.state.best_episode), "methods": {}}
    print(f"\ndense ppl {summary['dense_ppl']:.2f}\n")
    print(f"{'method':>16}  {'ratio':>5}  {'median':>9}  {'geo-mean':>9}  {'range':>22}")
    for method, by_ratio in runs.items():
        summary["methods"][method] = {}
        for r, values in by_ratio.items():
            stats = {"median": float(np.median(values)),
                     "geomean": float(math.exp(np.mean(np.log(values)))),
                     "min": float(min(values)), "max": float(max(values)), "values": values}
            summary["methods"][method][r] = stats
            print(f"{method:>16}  {r:>5}  {stats['median']:>9.1f}  {stats['geomean']:>9.1f}  "
                  f"{stats['min']:>10.1f}..{stats['max']:<10.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

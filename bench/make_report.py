"""The evaluation report of the default model (SmolLM2-135M) pruned at 10/20/30%, in memory.

Trains a policy as `launch.prune` does (seed 42, 20 episodes, at ratio 0.3, one step per layer),
prunes with it (`sample`, the reference's way) at each ratio, and adds uniform random slicing at
the same ratios as the baseline; then writes the report (gate spectra, KS per layer, perplexity on
the Python tutorial text) with `prunenet_jax.evaluation.report`. lm-eval is not run: it needs HF folders and
the datasets hub.

  .venv/bin/python bench/make_report.py            # -> bench/results/report_default/
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax import prune  # noqa: E402
from prunenet_jax import perplexity
from prunenet_jax import sources  # noqa: E402
from prunenet_jax.evaluation import measures, report, tables  # noqa: E402
from prunenet_jax.formats import texts
from prunenet_jax.method import episode, trainer
from prunenet_jax.models import registry  # noqa: E402

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--eval_text", default=TUTORIAL)
    ap.add_argument("--max_tokens", type=int, default=4096)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "report_default"))
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

    weights = sources.load_model(args.model)
    tokenizer = sources.load_tokenizer(weights)
    eval_texts = texts.read_texts(args.eval_text)
    W = weights.layers[registry.scored(weights.config)]

    measure = perplexity.perplexity_fn(tokenizer, perplexity.EvalConfig(
        eval_texts, seq_len=args.seq_len, batch_size=8, max_tokens=args.max_tokens))

    result = trainer.train(W, episode.TrainConfig(ratio=max(ratios)), seed=args.seed,
                         num_episodes=args.episodes)
    params = jax.tree.map(np.asarray, result.state.best_params)
    print(f"policy: best episode {int(result.state.best_episode)}, total reward "
          f"{float(result.state.best_reward):.2f}", flush=True)

    layers = measures.plotted_layers(weights.config.num_hidden_layers)
    dense_sv = measures.gate_spectra(weights)
    dense_ppl = measure(weights)
    models = [measures.model_record("dense", args.model, weights, 0.0,
                                  measures.gate_ks(dense_sv, dense_sv), dense_ppl)]
    spectra = [dense_sv[layers]]
    for mode in ("sample", "random"):
        for r in ratios:
            kept = prune.select_kept(params, W, r, mode, args.seed)  # as launch.prune
            pruned = prune.slice_weights(weights, kept)
            sv = measures.gate_spectra(pruned)
            name = f"{'policy' if mode == 'sample' else 'random'} {r:g}"
            models.append(measures.model_record(name, f"{args.model} pruned in memory (mode {mode}, "
                                              f"seed {args.seed})", pruned, r,
                                              measures.gate_ks(dense_sv, sv), measure(pruned)))
            spectra.append(sv[layers])
            print(f"{name}: mean KS {models[-1]['mean_ks']:.4f}, ppl {models[-1]['ppl']:.2f}", flush=True)

    summary = {**dense_ppl, "model": args.model, "eval_text": args.eval_text,
               "max_tokens": args.max_tokens, "seq_len": args.seq_len, "spectra_layers": layers,
               "lm_eval": None, "models": models,
               "policy": {"episodes": args.episodes, "train_ratio": max(ratios), "seed": args.seed,
                          "best_episode": int(result.state.best_episode)}}
    report.write_report(args.out, summary, spectra, overwrite=True)
    print(tables.format_table(models))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()

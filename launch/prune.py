"""Learn a PruneNet policy on a model and slice its FFNs at one or more ratios.

  python -m launch.prune --model=default --ratios=0.1,0.2,0.3 \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

import json

import jax
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from prunenet_jax import evaluate, hf_io, outputs, prune, sampling, sharding, texts, train
from prunenet_jax.launch import common
from prunenet_jax.models import llama, registry

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), an HF folder, a hub "
                    "id or a .gguf file")
flags.DEFINE_string("revision", None, "Hub revision when --model is a hub id")
flags.DEFINE_string("ratios", "0.1,0.2,0.3", "Comma-separated compression ratios in [0, 1)")
flags.DEFINE_float("train_ratio", None, "Ratio the policy is trained at (default: the largest of "
                   "--ratios); the trained policy then prunes at every ratio")
flags.DEFINE_integer("episodes", 20, "Training episodes")
flags.DEFINE_float("lr", 1e-3, "AdamW learning rate")
flags.DEFINE_float("gamma", 0.99, "Discount across layer depth")
flags.DEFINE_integer("seed", 42, "Seed of every random draw (policy init, episodes, slicing)")
flags.DEFINE_enum("mode", "sample", prune.MODES, "How channels are chosen when pruning: sample "
                  "(the reference), topk (largest logits, no noise), random (baseline, no policy)")
flags.DEFINE_enum("update_schedule", "layer", train.SCHEDULES, "layer: one AdamW step per layer "
                  "(the paper's code); episode: one step per episode, grad-norm clip 1.0")
flags.DEFINE_bool("use_kl", False, "Add the KL term to the loss")
flags.DEFINE_bool("reuse_noise", False, "Loss pass reuses the sampling noise (default: fresh noise, "
                  "as the reference)")
flags.DEFINE_string("eval_text", None, "Text files for perplexity of the dense and each pruned "
                    "model (comma-separated; a glob is one text of its sorted matches)")
flags.DEFINE_integer("max_tokens", 0, "Tokens per text to score (0: all)")
flags.DEFINE_integer("seq_len", 512, "Perplexity window length")
flags.DEFINE_integer("batch_size", 4, "Perplexity windows per forward pass")
flags.DEFINE_string("out_dir", None, "Where the policy, kept channels and results.json go")
common.define_parallel_flags()


def parse_ratios(spec: str) -> list[float]:
    try:
        ratios = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise common.UserError(f"--ratios={spec!r} is not a comma-separated list of numbers; "
                               "pass e.g. --ratios=0.1,0.2,0.3") from None
    if not ratios:
        raise common.UserError("--ratios is empty; pass e.g. --ratios=0.1,0.2,0.3")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise common.UserError(f"ratio {r} in --ratios is outside [0, 1); pass ratios such as 0.2")
    return ratios


def print_table(rows: list[dict], dense_params: int, dense_ppl) -> None:
    fmt = lambda p: "-" if p is None else f"{p:.3f}"
    print(f"{'ratio':>6}  {'kept':>6}  {'params':>13}  {'of dense':>8}  {'ppl':>10}")
    print(f"{'dense':>6}  {'':>6}  {dense_params:>13,}  {'100.0%':>8}  {fmt(dense_ppl):>10}")
    for r in rows:
        print(f"{r['ratio']:>6}  {r['kept']:>6}  {r['params']:>13,}  "
              f"{100 * r['params'] / dense_params:>7.1f}%  {fmt(r['ppl']):>10}")


def main(argv) -> None:
    # Validate everything cheap before the heavy work starts.
    ratios = parse_ratios(FLAGS.ratios)
    train_ratio = max(ratios) if FLAGS.train_ratio is None else FLAGS.train_ratio
    if FLAGS.episodes < 1:
        raise common.UserError(f"--episodes={FLAGS.episodes}: train for at least 1 episode")
    cfg = train.TrainConfig(ratio=train_ratio, gamma=FLAGS.gamma, schedule=FLAGS.update_schedule,
                            learning_rate=FLAGS.lr, use_kl=FLAGS.use_kl,
                            reuse_noise=FLAGS.reuse_noise)
    eval_texts = texts.read_texts(FLAGS.eval_text) if FLAGS.eval_text else None
    if FLAGS.out_dir:
        outputs.check_out_dir(FLAGS.out_dir, FLAGS.model)
    common.init_distributed()
    mesh = common.make_mesh()
    logging.info("mesh: %d devices over %d processes", 1 if mesh is None else mesh.size,
                 jax.process_count())
    if jax.process_index() == 0:
        weights = hf_io.load_model(FLAGS.model, revision=FLAGS.revision)
        config, W = weights.config, weights.layers[registry.GATE]
    else:  # other hosts only train: they read just their own layers' gate matrices, lazily
        weights = None
        config, W = hf_io.load_gate_stack(FLAGS.model, revision=FLAGS.revision)
    I = config.intermediate_size
    for r in ratios + [train_ratio]:
        sampling.num_kept(I, r)  # refuses a ratio that keeps no channel
    logging.info("loaded %s: %d layers, I=%d, H=%d", FLAGS.model, config.num_hidden_layers, I,
                 config.hidden_size)

    bar = tqdm(total=FLAGS.episodes, desc="episodes", disable=jax.process_index() != 0)

    def on_episode(e, m):
        bar.set_postfix(mean_ks=f"{float(np.mean(m.ks)):.4f}", total_reward=f"{float(m.total_reward):.2f}")
        bar.update(1)

    result = train.train(W, cfg, seed=FLAGS.seed, num_episodes=FLAGS.episodes, mesh=mesh,
                         callback=on_episode)
    bar.close()
    # Gathering to the host is a collective on multi-host runs: every process takes part.
    best_params = jax.tree.map(sharding.to_host, result.state.best_params)
    best_episode = int(sharding.to_host(result.state.best_episode))
    best_reward = float(sharding.to_host(result.state.best_reward))
    if weights is None:
        return  # process 0 prunes, evaluates and writes

    tokenizer = hf_io.load_tokenizer(weights) if eval_texts else None

    def ppl(w):
        if eval_texts is None:
            return None
        model = llama.from_named_arrays(w.config, w.named_arrays())
        return evaluate.perplexity(model, tokenizer, eval_texts, seq_len=FLAGS.seq_len,
                                   batch_size=FLAGS.batch_size,
                                   max_tokens=FLAGS.max_tokens or None)["ppl"]

    dense_ppl = ppl(weights)
    rows, kept = [], {}
    key = jax.random.fold_in(jax.random.key(FLAGS.seed), 2)  # 0: policy init, 1: episodes
    for r in ratios:
        k = sampling.num_kept(I, r)
        indices = prune.select_channels(best_params, W, k, FLAGS.mode, jax.random.fold_in(key, k))
        pruned = prune.slice_weights(weights, indices)
        kept[f"ratio_{r}"] = indices
        rows.append({"ratio": r, "kept": k, "params": pruned.num_params(), "ppl": ppl(pruned)})

    summary = {"results": rows, "dense_ppl": dense_ppl, "dense_params": weights.num_params(),
               "setup_seconds": result.setup_seconds,
               "episode_seconds": result.episode_seconds, "best_episode": best_episode,
               "best_total_reward": best_reward,
               "episode_total_rewards": [float(m.total_reward) for m in result.history],
               "train_ratio": train_ratio, "mode": FLAGS.mode, "seed": FLAGS.seed}
    if FLAGS.out_dir:
        history = {"ks": np.stack([m.ks for m in result.history]),
                   "rewards": np.stack([m.rewards for m in result.history]),
                   "indices": np.stack([m.indices for m in result.history])}
        outputs.write_run(FLAGS.out_dir, summary, best_params, kept, history)
    print_table(rows, weights.num_params(), dense_ppl)
    print(json.dumps(summary))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

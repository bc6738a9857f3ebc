"""Learn a PruneNet policy on a model and slice its FFNs at one or more ratios.

  python -m launch.prune --model=default --ratios=0.1,0.2,0.3 \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

import json
import os

import jax
from absl import flags, logging

from prunenet_jax.formats import orbax as checkpoints
from prunenet_jax import sources as hf_io
from prunenet_jax.run import atomic as outputs
from prunenet_jax.run import prune_run as pipeline
from prunenet_jax.method import trainer as training_run
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.launch import common, flags as pruning_flags
from prunenet_jax.models import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), an HF folder, a hub "
                    "id or a .gguf file")
flags.DEFINE_string("revision", None, "Hub revision when --model is a hub id")
flags.DEFINE_string("out_dir", None, "Where outputs go: policy/ (orbax), train_state/ (orbax, per "
                    "episode), ratio_<r>/orbax/, ratio_<r>/hf/ (--export_hf), manifest.json")
flags.DEFINE_string("policy", None, "Reuse a saved policy (an earlier run's <out_dir>/policy): no "
                    "training")
flags.DEFINE_bool("resume", False, "Continue the run in --out_dir: training from its last episode "
                  "checkpoint, then only the outputs not yet done")
common.define_parallel_flags()


def print_table(rows: list[dict], dense_params: int, dense_ppl) -> None:
    fmt = lambda p: "-" if p is None else f"{p:.3f}"
    print(f"{'ratio':>6}  {'kept':>6}  {'params':>13}  {'of dense':>8}  {'ppl':>10}")
    print(f"{'dense':>6}  {'':>6}  {dense_params:>13,}  {'100.0%':>8}  {fmt(dense_ppl):>10}")
    for r in rows:
        print(f"{r['ratio']:>6}  {r['kept']:>6}  {r['params']:>13,}  "
              f"{100 * r['params'] / dense_params:>7.1f}%  {fmt(r['ppl']):>10}")


def check_flags(ratios: list[float]) -> None:
    """Refuses flag combinations that cannot work, before anything is loaded."""
    pruning_flags.check(ratios)
    if FLAGS.resume and not FLAGS.out_dir:
        raise common.UserError("--resume needs --out_dir (the folder of the run to continue)")
    if FLAGS.resume and FLAGS.overwrite:
        raise common.UserError("--resume continues the run in --out_dir and --overwrite replaces "
                               "it; pass only one")
    if FLAGS.out_dir:
        inputs = [FLAGS.model] + ([FLAGS.policy] if FLAGS.policy else [])
        outputs.check_out_dir(FLAGS.out_dir, inputs, reuse=FLAGS.resume or FLAGS.overwrite)


def main(argv) -> None:
    # Validate everything cheap before the heavy work starts.
    ratios = pruning_flags.parse_ratios(FLAGS.ratios)
    check_flags(ratios)
    cfg = pruning_flags.train_config(ratios)
    eval_texts = pruning_flags.eval_texts()
    policy = checkpoints.load_policy(FLAGS.policy) if FLAGS.policy else None
    # The model's config is cheap to read: shape errors surface before the weights are loaded.
    config = hf_io.load_config(FLAGS.model, revision=FLAGS.revision)
    pruning_flags.check_ratios_fit(config.intermediate_size, ratios + [cfg.ratio], FLAGS.model)
    if policy is not None:
        checkpoints.check_policy_fits(policy[1], config, FLAGS.model, FLAGS.policy)
    common.init_distributed()
    mesh = common.make_mesh()
    logging.info("mesh: %d devices over %d processes", 1 if mesh is None else mesh.size,
                 jax.process_count())
    if policy is not None and jax.process_index() != 0:
        return  # nothing to train: process 0 prunes, evaluates and writes
    if jax.process_index() == 0:
        weights = hf_io.load_model(FLAGS.model, revision=FLAGS.revision)
        config, W = weights.config, weights.layers[registry.GATE]
    else:  # other hosts only train: they read just their own layers' gate matrices, lazily
        weights = None
        config, W = hf_io.load_gate_stack(FLAGS.model, revision=FLAGS.revision)
    logging.info("loaded %s: %d layers, I=%d, H=%d", FLAGS.model, config.num_hidden_layers,
                 config.intermediate_size, config.hidden_size)

    if policy is not None:
        params, training = policy[0], {"policy": os.path.abspath(FLAGS.policy)}
    else:
        params, training = training_run.train_policy(
            W, config, cfg, seed=FLAGS.seed, episodes=FLAGS.episodes, mesh=mesh,
            out_dir=FLAGS.out_dir, resume=FLAGS.resume, source=FLAGS.model,
            checkpoint_every=FLAGS.checkpoint_every)
        if weights is None:
            return  # process 0 prunes, evaluates and writes
    fingerprint = policy_lib.fingerprint(params)
    ppl = pruning_flags.ppl_fn(weights, eval_texts)
    dense_ppl = ppl(weights)
    header = {"model": FLAGS.model, "policy_dir": "policy" if policy is None else
              os.path.abspath(FLAGS.policy), "policy_fingerprint": fingerprint,
              "seed": FLAGS.seed, "mode": FLAGS.mode,
              "train_ratio": cfg.ratio if policy is None else policy[1]["train_config"]["ratio"],
              "dense_params": weights.num_params(), "dense_ppl": dense_ppl, "training": training,
              "command": common.command_line()}
    manifest = (pipeline.Manifest(FLAGS.out_dir, header, resume=FLAGS.resume)
                if FLAGS.out_dir else None)
    card = {"source": FLAGS.model, "command": common.command_line()}
    rows = pipeline.prune_at_ratios(
        weights, params, ratios, mode=FLAGS.mode, seed=FLAGS.seed, out_dir=FLAGS.out_dir,
        manifest=manifest, export_hf=FLAGS.export_hf, torch_format=FLAGS.torch_format,
        ppl_fn=ppl, card=card)
    print_table(rows, weights.num_params(), dense_ppl)
    print(json.dumps({**header, "outputs": rows}))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

"""Learn a PruneNet policy on a model and slice its FFNs at one or more ratios.

  python -m launch.prune --model=default --ratios=0.1,0.2,0.3 \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

import json

from absl import flags

from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags
from prunenet_jax.files import output_folder, run_lock
from prunenet_jax.run import prune_run

FLAGS = flags.FLAGS
launch_flags.define_model_flags()
flags.DEFINE_string("out_dir", None, "Where outputs go: policy/ (orbax), train_state/ (orbax, per "
                    "episode), [<mode>/]ratio_<r>/{orbax,hf}/ (<mode>/ with several modes), "
                    "calibration.npz and scores/ (energy), manifest.json")
flags.DEFINE_string("scores", None, "energy: reuse the channel scores of an earlier run of this model "
                    "(<out_dir>/scores): no calibration, no forward pass")
flags.DEFINE_string("policy", None, "Reuse a saved policy (an earlier run's <out_dir>/policy): no "
                    "training")
flags.DEFINE_bool("resume", False, "Continue the run in --out_dir: training from its last episode "
                  "checkpoint, then only the outputs not yet done")
launch_flags.define_pruning_flags()
launch_flags.define_eval_flags()
launch_flags.define_parallel_flags()
launch_flags.define_recovery_flags(default_steps=0)


def prune_job() -> prune_run.PruneJob:
    """The job the flags ask for; refuses flag combinations that cannot work, before anything
    is loaded."""
    ratios = launch_flags.parse_ratios(FLAGS.ratios)
    launch_flags.check_pruning_flags()
    if FLAGS.resume and not FLAGS.out_dir:
        raise common.UserError("--resume needs --out_dir (the folder of the run to continue)")
    if FLAGS.resume and FLAGS.overwrite:
        raise common.UserError("--resume continues the run in --out_dir and --overwrite replaces "
                               "it; pass only one")
    options = launch_flags.output_options(resume=FLAGS.resume)
    check_out_dir()
    calibration = launch_flags.calibration_config(options)
    return prune_run.PruneJob(
        model=FLAGS.model, revision=FLAGS.revision, ratios=tuple(ratios),
        training=launch_flags.training(ratios), outputs=options,
        out_dir=FLAGS.out_dir, policy=FLAGS.policy, resume=FLAGS.resume,
        eval=launch_flags.eval_config(), calibration=calibration, scores=FLAGS.scores,
        command=common.command_line())


def check_out_dir() -> None:
    if FLAGS.out_dir:
        inputs = [FLAGS.model] + [p for p in (FLAGS.policy, FLAGS.scores) if p]
        output_folder.check_out_dir(FLAGS.out_dir, inputs, reuse=FLAGS.resume or FLAGS.overwrite)


def print_table(result: prune_run.PruneResult) -> None:
    """One row per (ratio, mode), then the uniform-random baseline at each ratio."""
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    dense = result.dense_params
    print(f"{'ratio':>6}  {'mode':<24}  {'kept':>6}  {'params':>13}  {'of dense':>8}  {'ppl':>10}  "
          f"{'top-1 acc':>9}  {'retained':>8}")
    print(f"{'dense':>6}  {'':<24}  {'':>6}  {dense:>13,}  {'100.0%':>8}  {fmt(result.dense_ppl):>10}  "
          f"{fmt(result.dense_accuracy, '.4f'):>9}  {'':>8}")
    guard = " +guard" if result.header.get("guard") else ""
    for r in result.outputs:
        mode = (r.recipe.get("mode") or "") + (guard if r.recipe.get("guard") else "")
        print(f"{r.ratio:>6}  {mode:<24}  {r.kept:>6}  {r.params:>13,}  "
              f"{100 * r.params / dense:>7.1f}%  {fmt(r.ppl):>10}  "
              f"{fmt(r.extra.get('accuracy'), '.4f'):>9}  {pct(r.extra.get('accuracy_retention')):>8}")
    for ratio, b in (result.baseline or {}).items():
        print(f"{ratio:>6}  {'random baseline (1 draw)':<24}  {'':>6}  {'':>13}  {'':>8}  "
              f"{fmt(b.get('ppl')):>10}  {fmt(b.get('accuracy'), '.4f'):>9}  "
              f"{pct(b.get('accuracy_retention')):>8}")


def main(argv) -> None:
    job = prune_job()
    # One run per --out_dir (process 0 writes; the others only train). Checked again under the
    # lock: another run may have filled the folder since.
    with run_lock.hold(job.out_dir if not FLAGS.process_id else None):
        check_out_dir()
        result = prune_run.run(job, common.start_devices)
    if result is not None:  # process 0
        print_table(result)
        print(json.dumps(result.to_json()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

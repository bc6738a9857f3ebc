"""Prune many checkpoints at many ratios with one policy.

  python -m launch.batch_prune --checkpoints='ckpts/*' --ratios=0.1,0.2,0.3 \
      --policy=runs/smollm2/policy --out_dir=runs/batch --export_hf

Each checkpoint is loaded once, pruned at every ratio, written (orbax, and HF with --export_hf)
to `<out_dir>/<name>/ratio_<r>/`, and released before the next. `<out_dir>/manifest.json` records
every output with its status, after each one: rerunning the same command skips what is done. A
checkpoint that fails (missing, corrupt, other shapes than the policy's) is reported and skipped;
the exit code is then 1. Many VMs, one list: `--num_shards`/`--shard_index` (e.g. the worker
count and id of a TPU slice) give each VM every n-th checkpoint and its own manifest
(`manifests/shard-<i>-of-<n>.json`); each shard then merges all shard manifests it finds into
`manifest.json` (or run `--merge` once all are done). The work is in prunenet_jax/run/batch.py.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import jax
from absl import flags

from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags
from prunenet_jax.run import batch
from prunenet_jax.formats import run_dir
from prunenet_jax.files import run_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Comma-separated checkpoints (anything --model of "
                    "launch.prune accepts; a hub id may end in @<revision>), a text file with one "
                    "per line, or a glob")
flags.DEFINE_string("policy", None, "A saved policy (<out_dir>/policy of launch.prune); without it "
                    "a policy is trained on the first checkpoint and saved to <out_dir>/policy")
flags.DEFINE_string("out_dir", None, "Where outputs go: <name>/ratio_<r>/{orbax,hf}, manifest.json")
flags.DEFINE_integer("num_shards", None, "Split the checkpoint list over this many VMs (default: "
                     "jax.process_count(), 1 unless the platform starts JAX multi-host itself)")
flags.DEFINE_integer("shard_index", None, "This VM's share, 0-based (default: jax.process_index())")
flags.DEFINE_bool("merge", False, "Only merge the shard manifests in --out_dir into manifest.json")
launch_flags.define_pruning_flags()
launch_flags.define_eval_flags()
launch_flags.define_mesh_flag()
launch_flags.define_recovery_flags(default_steps=0)


def batch_job() -> batch.BatchJob:
    """The job the flags ask for, checked before anything is loaded (texts read last)."""
    if not FLAGS.checkpoints:
        raise common.UserError("--checkpoints is required: a comma list, a text file or a glob")
    ratios = launch_flags.parse_ratios(FLAGS.ratios)
    checkpoints = batch.parse_checkpoints(FLAGS.checkpoints)
    # No jax.distributed here: shards never talk to each other (and orbax saves made by several
    # processes of one distributed run at once interfere), so each VM runs on its own.
    num_shards = jax.process_count() if FLAGS.num_shards is None else FLAGS.num_shards
    shard_index = jax.process_index() if FLAGS.shard_index is None else FLAGS.shard_index
    launch_flags.check_pruning_flags()
    if not FLAGS.out_dir:
        raise common.UserError("--out_dir is required (where the pruned checkpoints and manifest go)")
    options = launch_flags.output_options(resume=not FLAGS.overwrite)
    job = batch.BatchJob(
        checkpoints=tuple(checkpoints), ratios=tuple(ratios),
        training=launch_flags.training(ratios), outputs=options,
        out_dir=FLAGS.out_dir, policy=FLAGS.policy, overwrite=FLAGS.overwrite,
        num_shards=num_shards, shard_index=shard_index, command=common.command_line())
    job.check()
    return dataclasses.replace(job, calibration=launch_flags.calibration_config(options),
                               eval=launch_flags.eval_config())


def print_summary(entries: list) -> None:
    width = max([len("checkpoint")] + [len(e.checkpoint) for e in entries])
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"{'checkpoint':<{width}}  {'ratio':>6}  {'mode':<14}  {'kept':>6}  {'params':>13}  "
          f"{'ppl':>10}  {'retained':>8}  status")
    for e in entries:
        mode = (e.recipe.get("mode") or "") + (" +guard" if e.recipe.get("guard") else "")
        kept = e.extra.get("accuracy_retention")
        print(f"{e.checkpoint:<{width}}  {e.ratio:>6}  {mode:<14}  {fmt(e.kept, ''):>6}  "
              f"{fmt(e.params, ','):>13}  {fmt(e.ppl, '.3f'):>10}  "
              f"{fmt(kept and 100 * kept, '.1f'):>7}%  {e.status}")


def main(argv) -> int:
    if FLAGS.merge:
        if not FLAGS.out_dir or FLAGS.num_shards is None:
            raise common.UserError("--merge needs --out_dir and --num_shards")
        print(json.dumps(run_dir.merge_manifests(FLAGS.out_dir, FLAGS.num_shards)))
        return 0
    job = batch_job()
    # Shards write disjoint items and manifests: each locks only its own share.
    with run_lock.hold(job.out_dir, name=run_dir.lock_name(job.shard_index, job.num_shards)):
        result = batch.run(job, common.make_mesh)
    print_summary(result.outputs)
    summary, failed = result.summary()
    print(json.dumps(summary))
    if failed:
        print(f"error: {len(failed)} of {result.num_checkpoints} checkpoints failed: "
              f"{', '.join(failed)} (details in {result.manifest_path})", file=sys.stderr)
        return 1
    return 0


def run():
    common.run(main)


if __name__ == "__main__":
    run()

r"""Prune many checkpoints at many ratios with one policy (prunenet_jax/run/batch.py); a rerun skips
what is done, a failed checkpoint is skipped (exit code 1).

  python -m launch.batch_prune --checkpoints='ckpts/*' --ratios=0.1,0.2,0.3 \
      --policy=runs/smollm2/policy --out_dir=runs/batch --export_hf
"""
from __future__ import annotations

import sys

import jax
from absl import flags

from prunenet_jax.files import json_files
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags
from prunenet_jax.run import batch

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
launch_flags.put_in_group(launch_flags.MODEL, "checkpoints")
launch_flags.put_in_group(launch_flags.OUTPUTS, "out_dir")
launch_flags.put_in_group(launch_flags.TRAINING, "policy")
launch_flags.put_in_group("shards (one batch split over machines)", "num_shards", "shard_index",
                          "merge")


def batch_job() -> batch.BatchJob:
    """The job the flags ask for (checked by batch.run, before anything is loaded). No
    jax.distributed: shards never talk to each other, so each VM runs on its own."""
    ratios = launch_flags.parse_ratios(FLAGS.ratios)
    launch_flags.warn_ignored_flags(policy_given=bool(FLAGS.policy))
    return batch.BatchJob(
        checkpoints=tuple(batch.parse_checkpoints(FLAGS.checkpoints) if FLAGS.checkpoints else ()),
        ratios=tuple(ratios), training=launch_flags.training(ratios),
        outputs=launch_flags.output_options(resume=not FLAGS.overwrite), out_dir=FLAGS.out_dir,
        policy=FLAGS.policy, overwrite=FLAGS.overwrite, command=common.command_line(),
        num_shards=jax.process_count() if FLAGS.num_shards is None else FLAGS.num_shards,
        shard_index=jax.process_index() if FLAGS.shard_index is None else FLAGS.shard_index,
        calibration=launch_flags.calibration_config(), eval=launch_flags.eval_config())


def main(argv) -> int:
    if FLAGS.merge:
        print(json_files.dumps(batch.merge(FLAGS.out_dir, FLAGS.num_shards)))
        return 0
    result = batch.run(batch_job(), common.make_mesh)
    print(result.format_table())
    print(json_files.dumps(result.summary()[0]))
    if result.failure():  # each checkpoint's error was reported as it failed
        print(f"error: {result.failure()}", file=sys.stderr)
    return 1 if result.failure() else 0


def run():
    common.run(main)


if __name__ == "__main__":
    run()

r"""Learn a PruneNet policy on a model and slice its FFNs at one or more ratios.

  python -m launch.prune --model=default --ratios=0.1,0.2,0.3 \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

from absl import flags

from prunenet_jax.files import json_files
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags
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
launch_flags.put_in_group(launch_flags.OUTPUTS, "out_dir", "resume")
launch_flags.put_in_group(launch_flags.TRAINING, "policy")
launch_flags.put_in_group(launch_flags.ENERGY, "scores")


def prune_job() -> prune_run.PruneJob:
    """The job the flags ask for (checked by prune_run.run, before anything is loaded)."""
    ratios = launch_flags.parse_ratios(FLAGS.ratios)
    launch_flags.warn_ignored_flags(policy_given=bool(FLAGS.policy))
    return prune_run.PruneJob(
        model=FLAGS.model, revision=FLAGS.revision, ratios=tuple(ratios),
        training=launch_flags.training(ratios),
        outputs=launch_flags.output_options(resume=FLAGS.resume), out_dir=FLAGS.out_dir,
        policy=FLAGS.policy, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
        eval=launch_flags.eval_config(), calibration=launch_flags.calibration_config(),
        scores=FLAGS.scores, process_id=FLAGS.process_id, command=common.command_line())


def main(argv) -> None:
    result = prune_run.run(prune_job(), common.start_devices)
    if result is not None:  # process 0
        print(result.format_table())
        print(json_files.dumps(result.to_json()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

r"""Recovery fine-tuning of pruned models: LoRA (default) or full, distilling the dense source on
text it samples itself (default) or on --train_text.

  python -m launch.recover --input=runs/default --out_dir=runs/default-recovered \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

from absl import flags

from prunenet_jax.files import json_files
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags
from prunenet_jax.recovery import job as recovery

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "A prune run folder (each finished output, narrowed by --ratio/"
                    "--mode), its [<mode>/]ratio_<r>, or a pruned model's orbax (or HF) folder",
                    required=True)
flags.DEFINE_string("dense", None, "The dense source model (default: the one recorded with the "
                    "pruned model)")
flags.DEFINE_string("out_dir", None, "Where the recovered models go: ratio_<r>/orbax, ratio_<r>/hf "
                    "(--export_hf), ratio_<r>/gguf (--export_gguf), recover_state/, manifest.json",
                    required=True)
flags.DEFINE_bool("export_hf", False, "Also write each recovered model as a Hugging Face folder")
launch_flags.define_gguf_flags("recovered")
flags.DEFINE_bool("overwrite", False, "Replace an earlier run's outputs in --out_dir")
flags.DEFINE_bool("resume", False, "Continue the run in --out_dir from its last recovery checkpoint")
flags.DEFINE_integer("data_devices", 0, "Devices of the data-parallel mesh (0: all)")
flags.DEFINE_enum("shard_params", "auto", ["auto", "on", "off"], "Split the trained parameters, "
                  "their optimiser state and the teacher over the data mesh (FSDP-style); auto: "
                  "when replicated they would take over 70% of one device's memory")
launch_flags.define_recovery_flags(default_steps=60)
launch_flags.define_eval_flags()
launch_flags.define_pick_flags()
launch_flags.put_in_group(launch_flags.MODEL, "input", "dense")
launch_flags.put_in_group(launch_flags.OUTPUTS, "out_dir", "export_hf", "export_gguf", "gguf_type",
                          "overwrite", "resume")
launch_flags.put_in_group(launch_flags.DEVICES, "data_devices", "shard_params")


def recover_job() -> recovery.RecoverJob:
    """The job the flags ask for (checked by recovery.run, before anything is loaded)."""
    return recovery.RecoverJob(
        input=FLAGS.input, out_dir=FLAGS.out_dir,
        recovery=launch_flags.recover_spec(FLAGS.resume, optional=False), dense=FLAGS.dense,
        export_hf=FLAGS.export_hf, export_gguf=FLAGS.export_gguf, gguf_type=FLAGS.gguf_type,
        overwrite=FLAGS.overwrite, eval=launch_flags.eval_config(),
        data_devices=FLAGS.data_devices, shard_params=FLAGS.shard_params,
        command=common.command_line(), ratio=FLAGS.ratio, mode=FLAGS.mode)


def main(argv) -> None:
    entries = recovery.run(recover_job())
    print(recovery.format_table(entries))
    print(json_files.dumps({"outputs": [e.to_json() for e in entries]}))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

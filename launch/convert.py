"""Convert a pruned model between our orbax checkpoint and a Hugging Face folder.

  python -m launch.convert --input=runs/smollm2/ratio_0.2/orbax --output=smollm2-pruned-hf
  python -m launch.convert --input=smollm2-pruned-hf --output=smollm2-pruned-orbax --to=orbax

The direction defaults to the other format than the input's: an orbax sliced model becomes an HF
folder; anything `--model` accepts elsewhere (HF folder, .gguf, hub id, `default`) becomes orbax.
"""
from __future__ import annotations

import json
import os

from absl import flags, logging

from prunenet_jax.formats import orbax as checkpoints
from prunenet_jax import sources as hf_io
from prunenet_jax.run import atomic as outputs
from prunenet_jax.launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "An orbax sliced model (ratio_<r>/orbax of a prune run), an HF "
                    "folder, a .gguf file, a hub id or 'default'")
flags.DEFINE_string("output", None, "The folder to write (must not exist unless --overwrite)")
flags.DEFINE_enum("to", None, ["hf", "orbax"], "Output format (default: hf for an orbax input, "
                  "orbax otherwise)")
flags.DEFINE_string("revision", None, "Hub revision when --input is a hub id")
flags.DEFINE_string("dtype", None, "HF output dtype: float32, bfloat16 or float16 (default: the "
                    "source config's)")
flags.DEFINE_bool("torch_format", False, "HF output: also write pytorch_model.bin (needs torch)")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output")


def main(argv) -> None:
    if not FLAGS.input or not FLAGS.output:
        raise common.UserError("--input and --output are required, e.g. --input=run/ratio_0.2/orbax "
                               "--output=pruned-hf")
    kind, path = hf_io.resolve_source(FLAGS.input, FLAGS.revision)
    to = FLAGS.to or ("hf" if kind == "orbax" else "orbax")
    if FLAGS.torch_format and to != "hf":
        raise common.UserError("--torch_format applies to HF output only; drop it or pass --to=hf")
    if FLAGS.dtype and to != "hf":
        raise common.UserError("--dtype applies to HF output only (orbax keeps the source dtypes)")
    dtype = None if FLAGS.dtype is None else common.numpy_dtype(FLAGS.dtype)
    outputs.check_out_dir(FLAGS.output, [FLAGS.input, path], reuse=FLAGS.overwrite,
                          name=f"--output={FLAGS.output}", replaced=True,
                          fix="pass --overwrite to replace it, or choose a new folder")
    if os.path.exists(FLAGS.output) and not FLAGS.overwrite:
        raise common.UserError(f"--output={FLAGS.output} exists; pass --overwrite to replace it")

    weights = hf_io.load_model(FLAGS.input, dtype=None, revision=FLAGS.revision)
    logging.info("loaded %s (%s): %d layers, I=%d", FLAGS.input, kind,
                 weights.config.num_hidden_layers, weights.config.intermediate_size)
    if to == "hf":
        from prunenet_jax.formats import hf as hf_export

        meta = checkpoints.read_meta(path) if kind == "orbax" else {"source": FLAGS.input}
        card = {**checkpoints.model_card_fields(meta or {}), "command": common.command_line()}
        hf_export.export_hf(weights, FLAGS.output, model_card=card, dtype=dtype,
                            torch_format=FLAGS.torch_format, overwrite=FLAGS.overwrite)
    else:
        checkpoints.save_model(FLAGS.output, weights, {"converted_from": FLAGS.input,
                                                       "command": common.command_line()},
                               overwrite=FLAGS.overwrite)
    print(json.dumps({"input": FLAGS.input, "input_format": kind, "output": FLAGS.output,
                      "output_format": to, "params": weights.num_params(),
                      "intermediate_size": weights.config.intermediate_size}))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

"""Convert a pruned model between our orbax checkpoint and a Hugging Face folder, or to GGUF.

  python -m launch.convert --input=runs/smollm2/ratio_0.2/orbax --output=smollm2-pruned-hf
  python -m launch.convert --input=smollm2-pruned-hf --output=smollm2-pruned-orbax --to=orbax
  python -m launch.convert --input=runs/smollm2 --ratio=0.2 --mode=energy --output=pruned-hf
  python -m launch.convert --input=runs/smollm2/ratio_0.2 --output=pruned-gguf --to=gguf --gguf_type=q8_0

The direction defaults to the other format than the input's: an orbax sliced model becomes an HF
folder; anything `--model` accepts elsewhere (HF folder, .gguf, hub id, `default`) becomes orbax.
A prune run folder or a ratio_<r> folder converts its orbax model. `--to=gguf` writes a folder
holding one .gguf file (llama.cpp, Ollama, LM Studio).
"""
from __future__ import annotations

from absl import flags

from prunenet_jax.files import json_files
from prunenet_jax.formats import gguf_export
from prunenet_jax.run import convert
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "A pruned model (a prune run's --out_dir, with --ratio/--mode "
                    "when it holds several; its [<mode>/]ratio_<r>; .../orbax or .../hf), an HF "
                    "folder, a .gguf file, a hub id or 'default'")
flags.DEFINE_string("output", None, "The folder to write (must not exist unless --overwrite)")
flags.DEFINE_enum("to", None, ["hf", "orbax", "gguf"], "Output format (default: hf for an orbax "
                  "input, orbax otherwise); gguf: a folder holding <name>.gguf")
flags.DEFINE_string("revision", None, "Hub revision when --input is a hub id")
flags.DEFINE_string("dtype", None, "HF output dtype: float32, bfloat16 or float16 (default: the "
                    "source config's)")
flags.DEFINE_bool("torch_format", False, "HF output: also write pytorch_model.bin (needs torch)")
flags.DEFINE_enum("gguf_type", gguf_export.DEFAULT_GGUF_TYPE, gguf_export.GGUF_TYPES,
                  gguf_export.TYPE_HELP)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output")
launch_flags.define_pick_flags()
launch_flags.put_in_group(launch_flags.MODEL, "input", "revision")
launch_flags.put_in_group(launch_flags.OUTPUTS, "output", "to", "dtype", "torch_format",
                          "gguf_type", "overwrite")


def main(argv) -> None:
    job = convert.ConvertJob(input=FLAGS.input, output=FLAGS.output, to=FLAGS.to,
                             revision=FLAGS.revision, dtype=FLAGS.dtype,
                             torch_format=FLAGS.torch_format, gguf_type=FLAGS.gguf_type,
                             overwrite=FLAGS.overwrite,
                             command=common.command_line(), ratio=FLAGS.ratio, mode=FLAGS.mode)
    print(json_files.dumps(convert.convert(job)))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

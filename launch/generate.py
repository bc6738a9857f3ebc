"""Generate text with a dense or pruned model (KV-cache sampler, models/decode.py).

  python -m launch.generate --model=default --prompt='The capital of France is' --max_new_tokens=32
  python -m launch.generate --model=runs/default/ratio_0.2/orbax --chat --prompt='Name three colours.'
  python -m launch.generate --model=runs/default --ratio=0.2 --mode=energy --prompt='Hello'

Prints the completion, then as its last line one JSON object: {"prompt", "completion", "tokens"}
(the completion's text without special tokens, and its token ids, the stopping EOS id included).
"""
from __future__ import annotations

from absl import flags

from prunenet_jax import generation
from prunenet_jax.files import json_files
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), 'gemma3-270m', "
                    "an HF folder, a hub id, a .gguf file, or a pruned model: a prune run's --out_dir (with --ratio/"
                    "--mode when it holds several), its [<mode>/]ratio_<r>, or .../orbax, .../hf")
flags.DEFINE_string("revision", None, "Hub revision when --model is a hub id")
flags.DEFINE_string("prompt", None, "The text to continue (or, with --chat, the user's message)")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate (fewer when an EOS id comes)")
flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise the sampling temperature")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: draw from the most likely tokens whose "
                   "probability reaches top_p (1: all tokens)")
flags.DEFINE_integer("seed", 0, "Seed of the sampling draws")
flags.DEFINE_bool("chat", False, "Wrap --prompt as a user message in the tokenizer's chat template")
flags.DEFINE_bool("truncate_prompt", False, "When the prompt plus --max_new_tokens exceed the "
                  "model's context (max_position_embeddings), keep the prompt's last tokens (with a "
                  "warning) instead of refusing")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16")
launch_flags.define_pick_flags()
launch_flags.put_in_group(launch_flags.MODEL, "model", "revision")
launch_flags.put_in_group("generation", "prompt", "chat", "truncate_prompt", "max_new_tokens",
                          "temperature", "top_p", "seed", "dtype")


def main(argv) -> None:
    result = generation.generate(generation.GenerateJob(
        model=FLAGS.model, prompt=FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed, chat=FLAGS.chat,
        dtype=FLAGS.dtype, revision=FLAGS.revision,
        ratio=FLAGS.ratio, mode=FLAGS.mode, truncate_prompt=FLAGS.truncate_prompt))
    print(result["completion"])
    print(json_files.dumps(result))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

"""Perplexity of a model on text files, in JAX.

  python -m launch.evaluate --model=default \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384
"""
from __future__ import annotations

import json

from absl import flags, logging

from prunenet_jax import evaluate, hf_io, texts
from prunenet_jax.launch import common
from prunenet_jax.models import llama

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), an HF folder, a hub id "
                    "or a .gguf file")
flags.DEFINE_string("revision", None, "Hub revision (branch, tag or commit) when --model is a hub id")
flags.DEFINE_string("eval_text", None, "Comma-separated text files (.gz allowed); a glob is one text "
                    "made of its matches in sorted name order")
flags.DEFINE_integer("max_tokens", 0, "Tokens per text to score (0: all)")
flags.DEFINE_integer("seq_len", 512, "Window length; windows do not overlap")
flags.DEFINE_integer("batch_size", 4, "Windows per forward pass")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16")


def print_table(result: dict) -> None:
    width = max(len("text"), *(len(n) for n in result["files"]))
    print(f"{'text':<{width}}  {'tokens':>8}  {'ppl':>10}")
    for name, r in result["files"].items():
        print(f"{name:<{width}}  {r['tokens']:>8}  {r['ppl']:>10.4f}")
    print(f"{'all':<{width}}  {result['tokens']:>8}  {result['ppl']:>10.4f}")


def main(argv) -> None:
    if not FLAGS.eval_text:
        raise common.UserError("--eval_text is required; pass one or more text files")
    if FLAGS.max_tokens < 0:
        raise common.UserError(f"--max_tokens={FLAGS.max_tokens} must be >= 0 (0 means all)")
    dtype = common.dtype(FLAGS.dtype)
    eval_texts = texts.read_texts(FLAGS.eval_text)  # validate inputs before the heavy load
    weights = hf_io.load_model(FLAGS.model, revision=FLAGS.revision)
    logging.info("loaded %s: %d layers, %.1fM parameters", weights.source,
                 weights.config.num_hidden_layers, weights.num_params() / 1e6)
    tokenizer = hf_io.load_tokenizer(weights)
    model = llama.from_named_arrays(weights.config, weights.named_arrays(), dtype=dtype)
    result = evaluate.perplexity(model, tokenizer, eval_texts, seq_len=FLAGS.seq_len,
                                 batch_size=FLAGS.batch_size, max_tokens=FLAGS.max_tokens or None)
    print_table(result)
    print(json.dumps(result))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

"""Generate text with a dense or pruned model (KV-cache sampler, models/sampler.py).

  python -m launch.generate --model=default --prompt='The capital of France is' --max_new_tokens=32
  python -m launch.generate --model=runs/default/ratio_0.2/orbax --chat --prompt='Name three colours.'

Prints the completion, then as its last line one JSON object: {"prompt", "completion", "tokens"}
(the completion's text without special tokens, and its token ids, the stopping EOS id included).
"""
from __future__ import annotations

import json
import os

from absl import flags, logging

from prunenet_jax import hf_io
from prunenet_jax.launch import common
from prunenet_jax.models import llama, sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), an HF folder, a hub "
                    "id, a .gguf file, or a pruned model (<out_dir>/ratio_<r>/orbax or .../hf)")
flags.DEFINE_string("revision", None, "Hub revision when --model is a hub id")
flags.DEFINE_string("prompt", None, "The text to continue (or, with --chat, the user's message)")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate (fewer when an EOS id comes)")
flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise the sampling temperature")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: draw from the most likely tokens whose "
                   "probability reaches top_p (1: all tokens)")
flags.DEFINE_integer("seed", 0, "Seed of the sampling draws")
flags.DEFINE_bool("chat", False, "Wrap --prompt as a user message in the tokenizer's chat template")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16")


def check_flags() -> None:
    checks = [(FLAGS.prompt is None, "--prompt is required, e.g. --prompt='Once upon a time'"),
              (FLAGS.max_new_tokens < 1, f"--max_new_tokens={FLAGS.max_new_tokens} must be at least 1"),
              (FLAGS.temperature < 0, f"--temperature={FLAGS.temperature} must be >= 0 (0 is greedy)"),
              (not 0 < FLAGS.top_p <= 1, f"--top_p={FLAGS.top_p} must be in (0, 1] (1 keeps every token)")]
    for bad, message in checks:
        if bad:
            raise common.UserError(message)


def eos_ids(weights) -> list[int]:
    """The EOS ids of config.json and, in an HF folder, generation_config.json (either may list several)."""
    found = [weights.hf_config.get("eos_token_id")]
    path = os.path.join(weights.tokenizer_dir or "", "generation_config.json")
    if weights.tokenizer_dir and os.path.isfile(path):
        with open(path) as f:
            found.append(json.load(f).get("eos_token_id"))
    ids = []
    for e in found:
        ids += e if isinstance(e, list) else [] if e is None else [e]
    return sorted(set(int(i) for i in ids))


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise common.UserError(f"--chat: the tokenizer of --model={FLAGS.model} has no chat template; "
                               "drop --chat to continue the prompt as plain text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def main(argv) -> None:
    check_flags()
    dtype = common.dtype(FLAGS.dtype)
    weights = hf_io.load_model(FLAGS.model, revision=FLAGS.revision)
    tokenizer = hf_io.load_tokenizer(weights)
    ids = prompt_ids(tokenizer, FLAGS.prompt, FLAGS.chat)
    if not ids:
        raise common.UserError("--prompt is empty after tokenisation; pass some text")
    model = llama.from_named_arrays(weights.config, weights.named_arrays(), dtype=dtype)
    eos = eos_ids(weights)
    del weights
    logging.info("prompt of %d tokens, EOS ids %s", len(ids), eos)
    tokens = sampler.generate(model, [ids], FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              top_p=FLAGS.top_p, seed=FLAGS.seed, eos_ids=eos)[0]
    completion = tokenizer.decode(tokens, skip_special_tokens=True)
    print(completion)
    print(json.dumps({"prompt": FLAGS.prompt, "completion": completion, "tokens": tokens}))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

"""A real llama.cpp run of exported GGUF files (issue 24's check; bench, not CI).

llama-cpp-python builds llama.cpp from source (10-20 minutes on 2 cores), so it lives in its own
venv and this script runs in two halves:

  # 1. in the project's venv: token ids of the text, and our own perplexity of each file
  .venv/bin/python bench/llama_cpp_gguf.py ours --text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' \
      --tokens=4096 --out=/tmp/llama_cpp_ids.json FILE.gguf [FILE.gguf ...]
  # 2. in a venv with llama-cpp-python: llama.cpp's perplexity on the same windows, and text
  python bench/llama_cpp_gguf.py llama --ids=/tmp/llama_cpp_ids.json FILE.gguf [...]

Perplexity: non-overlapping windows of 512 tokens of our tokenisation of the text, every
position after the first of each window scored, in both halves alike. Generation: greedy, 48
tokens, from each prompt.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

WINDOW = 512
PROMPTS = ["Python is a programming language that", "To define a function in Python, you",
           "The capital of France is"]


def ours(args):
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from prunenet_jax import sources
    from prunenet_jax.models import decoder

    result = {"files": {}}
    ids = None
    for path in args.files:
        weights = sources.load_model(path)
        if ids is None:
            tok = sources.load_tokenizer(weights)
            text = "".join(open(f).read() for f in sorted(glob.glob(args.text)))
            ids = tok(text)["input_ids"][:args.tokens]
            result["ids"] = ids
        model = decoder.from_named_arrays(weights.config, weights.named_arrays())
        nll, n = 0.0, 0
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):
            w = np.array([ids[start:start + WINDOW]])
            logits = np.asarray(model(jnp.asarray(w), jnp.ones(w.shape, jnp.int32)))[0]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(WINDOW - 1), w[0, 1:]].sum())
            n += WINDOW - 1
        result["files"][path] = {"ppl": math.exp(nll / n), "tokens_scored": n,
                                 "bytes": os.path.getsize(path)}
        print(path, result["files"][path], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


def llama(args):
    import numpy as np
    from llama_cpp import Llama

    data = json.load(open(args.ids))
    ids = data["ids"]
    for path in args.files:
        t = time.time()
        llm = Llama(model_path=path, n_ctx=WINDOW, logits_all=True, verbose=False, n_threads=2)
        load = time.time() - t
        nll, n = 0.0, 0
        t = time.time()
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):
            llm.reset()
            llm.eval(ids[start:start + WINDOW])
            logits = np.asarray(llm.scores[:WINDOW], dtype=np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(WINDOW - 1), ids[start + 1:start + WINDOW]].sum())
            n += WINDOW - 1
        ppl = math.exp(nll / n)
        theirs = data["files"].get(path, {}).get("ppl")
        print(f"{os.path.basename(path)}: {os.path.getsize(path):,} bytes, loaded in {load:.1f} s; "
              f"llama.cpp ppl {ppl:.4f} over {n} tokens ({time.time() - t:.1f} s); ours "
              f"{theirs:.4f} ({100 * (ppl / theirs - 1):+.3f}%)" if theirs else f"ppl {ppl:.4f}")
        for prompt in PROMPTS:
            llm.reset()
            out = llm(prompt, max_tokens=48, temperature=0.0)
            print(f"  {prompt!r} -> {out['choices'][0]['text']!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("half", choices=["ours", "llama"])
    p.add_argument("files", nargs="+")
    p.add_argument("--text", default="/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default="/tmp/llama_cpp_ids.json")
    p.add_argument("--ids", default="/tmp/llama_cpp_ids.json")
    args = p.parse_args()
    (ours if args.half == "ours" else llama)(args)


if __name__ == "__main__":
    main()

"""Greedy generation speed of the KV-cache sampler on the default model (after compilation).

Prints one JSON line per batch size: compile seconds (first call), then seconds and tokens/s of a
second call with the same shapes (no EOS stop, so every row generates --new_tokens), and with
--torch the same for transformers' `generate` on the same GGUF (fp32).

  .venv/bin/python bench/bench_generate.py --batch=1,4 --new_tokens=128 [--torch]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunenet_jax import sources  # noqa: E402
from prunenet_jax.formats import gguf as gguf_io  # noqa: E402
from prunenet_jax.models import decoder, decode

PROMPT = "The Python tutorial explains how to define a function:"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,4", help="comma list of batch sizes")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--torch", action="store_true", help="also time transformers' generate")
    args = ap.parse_args()
    weights = sources.load_model("default")
    ids = sources.load_tokenizer(weights)(PROMPT)["input_ids"]
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    hf = None
    if args.torch:
        import torch
        from transformers import AutoModelForCausalLM

        folder, name = os.path.split(gguf_io.default_model_path())
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    for batch in (int(b) for b in args.batch.split(",")):
        run = lambda: decode.generate(model, [ids] * batch, args.new_tokens)
        _, first = timed(run)
        out, seconds = timed(run)
        n = sum(len(o) for o in out)
        row = {"batch": batch, "prompt_tokens": len(ids), "new_tokens": n, "first_call_s": round(first, 2),
               "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 1)}
        if hf is not None:
            with torch.no_grad():
                gen = lambda: hf.generate(torch.tensor([ids] * batch), max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2)
                gen()
                _, t = timed(gen)
            row.update(torch_seconds=round(t, 3), torch_tokens_per_s=round(batch * args.new_tokens / t, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Compile time of the model forward (the perplexity step) against depth, on a small random config.

With the layers scanned, compile time should not grow with depth; unrolled, it grows about
linearly. Prints one JSON line per depth: layers, compile seconds (lower + compile), run seconds.

  .venv/bin/python bench/bench_compile.py --layers=4,32,80 [--unrolled]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prunenet_jax.models import decoder
from prunenet_jax.models.config import ModelConfig  # noqa: E402


def config(layers: int, args) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                       norm_eps=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,32", help="comma list of depths")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--unrolled", action="store_true", help="a Python loop over layers (no scan)")
    args = ap.parse_args()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)))
    mask = jnp.ones_like(tokens)
    for layers in (int(x) for x in args.layers.split(",")):
        model = decoder.CausalLM(config(layers, args), scan=False if args.unrolled else None)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))
        t0 = time.perf_counter()
        compiled = forward.lower(state, tokens, mask).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state, tokens, mask))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, tokens, mask))
        print(json.dumps({"layers": layers, "unrolled": args.unrolled, "compile_s": round(compile_s, 3),
                          "run_s": round(time.perf_counter() - t0, 4)}), flush=True)


if __name__ == "__main__":
    main()

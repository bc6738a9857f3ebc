"""Cost of compensation-aware removal (method/compensation.greedy_removal) for ONE layer.

  .venv/bin/python bench/time_compensation.py --intermediate=11008 --hidden=4096 --ratio=0.3 --steps=20

Times the setup (the I x I inverse, O(I^3)) and `--steps` removals at the given shape, and
extrapolates to the ratio's removal count (each removal costs the same: two rank-one downdates,
of the H x I fit and the I x I inverse). Random symmetric positive definite G; float64, host.
"""
import argparse
import os
import platform
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from prunenet_jax.method import compensation

    size, hidden = args.intermediate, args.hidden
    rng = np.random.default_rng(0)
    X = rng.standard_normal((size + 64, size), dtype=np.float32)
    G = (X.T @ X).astype(np.float64) / len(X)
    del X
    down = rng.standard_normal((hidden, size))
    ridge = compensation.ridge_of(G, 1e-2)
    removals = int(round(args.ratio * size))

    start = time.perf_counter()
    compensation.greedy_removal(G, down, 0, ridge=ridge)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compensation.greedy_removal(G, down, args.steps, ridge=ridge)
    per_step = (time.perf_counter() - start - setup) / args.steps
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"shape I={size} H={hidden}: setup (inverse) {setup:.1f} s, {per_step:.3f} s per removal; "
          f"{removals} removals ({args.ratio:.0%}) -> {setup + removals * per_step:.0f} s per layer "
          f"(extrapolated from {args.steps} removals)")


if __name__ == "__main__":
    main()

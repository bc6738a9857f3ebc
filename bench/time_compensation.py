"""Cost of the compensated mode's choice for ONE layer (method/compensated.candidates): per damping
one greedy block removal and one re-fit of energy's channels, each scored on held-out moments.

  .venv/bin/python bench/time_compensation.py --intermediate=11008 --hidden=4096 --ratio=0.3

Random symmetric positive definite moments (fit and held-out) and a random down_proj at the given
shape; float64, host. The forward passes that measure the moments are not included (they cost
what the energy statistics cost, once per layer). Prints the CPU, the seconds and the peak RSS.
"""
import argparse
import os
import platform
import resource
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--dampings", default=None, help="comma list (default: the mode's)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from prunenet_jax.method import compensated

    size, hidden = args.intermediate, args.hidden
    rng = np.random.default_rng(0)
    moments = []
    for _ in range(2):
        X = rng.standard_normal((size + 64, size), dtype=np.float32)
        moments.append((X.T @ X).astype(np.float64) / len(X))
        del X
    down = rng.standard_normal((hidden, size))
    dampings = (compensated.DAMPINGS if args.dampings is None
                else tuple(float(d) for d in args.dampings.split(",")))
    removals = int(round(args.ratio * size))
    start = time.perf_counter()
    found = compensated.candidates(moments[0], moments[1], down, removals, dampings)
    seconds = time.perf_counter() - start
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l)
    except (OSError, StopIteration):
        pass
    print(f"cpu: {cpu}, {os.cpu_count()} cores")
    print(f"shape I={size} H={hidden}, {removals} removals ({args.ratio:.0%}), dampings {dampings}: "
          f"{len(found)} candidates in {seconds:.1f} s for one layer; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()

"""Training at LLaMA-2-7B shapes: 32 layers of gate matrices I=11008 x H=4096 (synthetic weights).

Prints the reference-spectra setup time, seconds per episode (the first includes compilation),
peak host RSS and the devices used. The method's cost depends only on the shapes, so synthetic
weights time it faithfully.

  CPU, one episode:      .venv/bin/python bench/bench_scale.py --episodes=1
  GPU/TPU, 20 episodes:  python bench/bench_scale.py --episodes=20      (target on one H200: < 60 s)
  quick CPU look:        .venv/bin/python bench/bench_scale.py --layers=4 --episodes=2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax.method import sharding  # noqa: E402
from prunenet_jax.method import train  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--episodes", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--schedule", default="layer", choices=train.SCHEDULES)
    ap.add_argument("--mesh", type=int, default=0, help="devices on the layer axis (0: all)")
    args = ap.parse_args()

    L, I, H = args.layers, args.intermediate, args.hidden
    t0 = time.perf_counter()
    W = np.empty((L, I, H), np.float32)
    rng = np.random.default_rng(0)
    for l in range(L):  # LLaMA-like scale; one layer at a time keeps host memory at one copy
        W[l] = rng.standard_normal((I, H), np.float32) * 0.02
    make = time.perf_counter() - t0
    n = args.mesh or jax.device_count()
    mesh = sharding.make_mesh(n) if n > 1 else None

    def report(e, m):
        print(f"episode {e} done, total reward {float(m.total_reward):.2f}", flush=True)

    t0 = time.perf_counter()
    result = train.train(W, train.TrainConfig(ratio=args.ratio, schedule=args.schedule),
                         num_episodes=args.episodes, mesh=mesh, callback=report)
    total = time.perf_counter() - t0
    out = {"layers": L, "intermediate": I, "hidden": H, "ratio": args.ratio,
           "schedule": args.schedule, "devices": [str(d) for d in jax.devices()[:n]],
           "make_weights_seconds": make, "train_seconds_total": total,
           "episode_seconds": result.episode_seconds, "setup_seconds": result.setup_seconds,
           "peak_rss_gib": peak_rss_gib()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Training at LLaMA-2-7B shapes: 32 layers of gate matrices I=11008 x H=4096 (synthetic weights).

Prints the setup time (placing the stack, Grams, reference spectra), seconds per episode (the first
includes compilation), peak host RSS, peak device memory where the backend reports it, and the
devices used. The method's cost depends only on the shapes, so synthetic weights time it
faithfully. The weights are made a layer at a time when read (a LazyLayerStack, as a checkpoint is
read), so no host copy of the stack exists: peak RSS is what training itself needs.

  CPU, one episode:      .venv/bin/python bench/bench_scale.py --episodes=1
  GPU/TPU, 20 episodes:  python bench/bench_scale.py --episodes=20 --dtype=bfloat16  (goal on one H200: < 60 s)
  quick CPU look:        .venv/bin/python bench/bench_scale.py --layers=4 --episodes=2
  70B shape:             --layers=80 --intermediate=28672 --hidden=8192 --dtype=bfloat16
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax.method import episode, sharding, trainer
from prunenet_jax.formats.layer_stack import LazyLayerStack  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--episodes", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="stored dtype of the gate matrices (kept on the device as is)")
    ap.add_argument("--schedule", default="layer", choices=episode.SCHEDULES)
    ap.add_argument("--mesh", type=int, default=0, help="devices on the layer axis (0: all)")
    args = ap.parse_args()

    L, I, H = args.layers, args.intermediate, args.hidden
    dtype = np.dtype(jnp.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)

    def make_layer(l):  # LLaMA-like scale, one layer at a time, the same values in every run
        rng = np.random.default_rng([0, l])
        return (rng.standard_normal((I, H), np.float32) * 0.02).astype(dtype)

    W = LazyLayerStack((L, I, H), dtype, make_layer)
    n = args.mesh or jax.device_count()
    mesh = sharding.make_mesh(n) if n > 1 else None

    def report(e, m):
        print(f"episode {e} done, total reward {float(m.total_reward):.2f}", flush=True)

    t0 = time.perf_counter()
    result = trainer.train(W, episode.TrainConfig(ratio=args.ratio, schedule=args.schedule),
                         num_episodes=args.episodes, mesh=mesh, callback=report)
    total = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    out = {"layers": L, "intermediate": I, "hidden": H, "dtype": args.dtype, "ratio": args.ratio,
           "schedule": args.schedule, "devices": [str(d) for d in jax.devices()[:n]],
           "train_seconds_total": total,
           "episode_seconds": result.episode_seconds, "setup_seconds": result.setup_seconds,
           "peak_rss_gib": peak_rss_gib(),
           "peak_device_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

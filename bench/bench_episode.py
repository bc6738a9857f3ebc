"""Seconds per training episode: the reference (efficient-pruners 0.1.0, PyTorch CPU, own venv)
against ours, on the same model (the default SmolLM2-135M converted to an HF folder), same number
of episodes, ratio 0.3, run one after the other on this machine. Prints both and the ratio.

  .venv/bin/python bench/bench_episode.py --episodes=3

Sets up the reference venv and the converted folder first when they are missing
(bench/reference/make_venv.sh, bench/reference/convert_default.py). Our first episode includes
compilation; the figure compared is the median over episodes after the first for ours, and the
median over all episodes for the reference (it has no compilation).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ensure_reference(venv: str, model_dir: str) -> None:
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run(["bash", os.path.join(ROOT, "bench/reference/make_venv.sh"), venv], check=True)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        subprocess.run([os.path.join(venv, "bin", "python"),
                        os.path.join(ROOT, "bench/reference/convert_default.py"), model_dir], check=True)


def time_reference(venv: str, model_dir: str, episodes: int, ratio: float) -> dict:
    out = subprocess.run([os.path.join(venv, "bin", "python"),
                          os.path.join(ROOT, "bench/reference/time_reference.py"), "time",
                          "--episodes", str(episodes), "--ratio", str(ratio), "--model-dir", model_dir],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_ours(model_dir: str, episodes: int, ratio: float, schedule: str) -> dict:
    from prunenet_jax import sources
    from prunenet_jax.method import train
    from prunenet_jax.models import registry

    t0 = time.perf_counter()
    W = sources.load_model(model_dir).layers[registry.GATE]
    load = time.perf_counter() - t0
    seconds = train.train(W, train.TrainConfig(ratio=ratio, schedule=schedule),
                          num_episodes=episodes).episode_seconds
    steady = seconds[1:] or seconds
    return {"impl": f"ours ({schedule} schedule)", "episodes": episodes, "episode_seconds": seconds,
            "median_episode_seconds": statistics.median(steady), "load_seconds": load,
            "note": "first episode includes compilation; median over the rest"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--ref_venv", default="/work/refvenv")
    ap.add_argument("--model_dir", default="/work/refdata/smollm2-135m-llama")
    ap.add_argument("--skip_reference", action="store_true")
    args = ap.parse_args()
    ensure_reference(args.ref_venv, args.model_dir)
    results = [time_ours(args.model_dir, args.episodes, args.ratio, s) for s in ("layer", "episode")]
    if not args.skip_reference:
        results.append(time_reference(args.ref_venv, args.model_dir, args.episodes, args.ratio))
    for r in results:
        print(f"{r['impl']:>26}: {r['median_episode_seconds']:8.2f} s/episode  "
              f"(all: {', '.join(f'{s:.2f}' for s in r['episode_seconds'])})")
    if not args.skip_reference:
        ref = results[-1]["median_episode_seconds"]
        for r in results[:-1]:
            print(f"speed-up of {r['impl']} over the reference: {ref / r['median_episode_seconds']:.1f}x")
    print(json.dumps({"load_avg": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()

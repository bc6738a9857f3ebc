"""Seconds per training episode on the default model (SmolLM2-135M gate matrices, ratio 0.3):
ours, the reference's (efficient-pruners 0.1.0, PyTorch CPU, own venv) and the floor, all in one
run on this machine, with the ratios.

The floor is the spectral work an episode cannot avoid, done with plain BLAS/LAPACK: the Gram of
every layer's kept rows (numpy sgemm) plus its eigenvalues, for the same matrices (our last
episode's actions). Each eigensolver candidate is timed on those Grams and checked against fp64
(max error relative to the largest eigenvalue); the floor takes the fastest correct one.

  .venv/bin/python bench/bench_episode.py --episodes=3              # reference when its venv exists
  .venv/bin/python bench/bench_episode.py --episodes=3 --build_reference

The reference needs its venv and an HF folder converted from the GGUF (bench/reference/make_venv.sh,
bench/reference/convert_default.py; --build_reference makes them, a few minutes). Without them its
figure is printed as not measured in this run. Our first episode includes compilation; the figure
compared is the median over episodes after the first for ours, and the median over all episodes
for the reference (it has no compilation).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def reference_ready(venv: str, model_dir: str) -> bool:
    return (os.path.exists(os.path.join(venv, "bin", "python"))
            and os.path.isfile(os.path.join(model_dir, "config.json")))


def build_reference(venv: str, model_dir: str) -> None:
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


def default_gate_matrices() -> np.ndarray:
    from prunenet_jax.formats import gguf as gguf_io

    _, stack = gguf_io.gguf_gate_stack(gguf_io.default_model_path())
    return np.asarray(stack[:], np.float32)


def time_ours(W: np.ndarray, episodes: int, ratio: float, schedule: str) -> dict:
    from prunenet_jax.method import episode, trainer

    result = trainer.train(W, episode.TrainConfig(ratio=ratio, schedule=schedule), num_episodes=episodes)
    seconds = result.episode_seconds
    steady = seconds[1:] or seconds
    return {"impl": f"ours ({schedule} schedule)", "episodes": episodes, "episode_seconds": seconds,
            "median_episode_seconds": statistics.median(steady),
            "last_indices": result.history[-1].indices,
            "note": "first episode includes compilation; median over the rest"}


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_floor(W: np.ndarray, indices: np.ndarray) -> dict:
    """Gram of the kept rows + eigenvalues, per candidate solver, on the same matrices."""
    import jax
    import jax.numpy as jnp
    import scipy.linalg

    rows = np.take_along_axis(W, indices[:, :, None], 1)  # (L, k, H) fp32
    grams = np.stack([r.T @ r for r in rows])
    exact = np.linalg.eigvalsh(grams.astype(np.float64))
    scale = exact.max(axis=-1, keepdims=True)
    jx_eigh = jax.jit(jax.vmap(jnp.linalg.eigvalsh))
    jx_svd = jax.jit(jax.vmap(lambda a: jnp.linalg.svd(a, compute_uv=False)))
    scipy_vals = lambda driver: lambda: np.stack([scipy.linalg.eigh(
        g, eigvals_only=True, driver=driver, check_finite=False) for g in grams])
    solvers = {
        "scipy eigh evd (values only)": scipy_vals("evd"),
        "scipy eigh evr (values only)": scipy_vals("evr"),
        "scipy eigh ev (values only)": scipy_vals("ev"),
        "numpy eigvalsh": lambda: np.linalg.eigvalsh(grams),
        "jnp.linalg.eigvalsh (XLA, vmapped)": lambda: np.asarray(jx_eigh(grams)),
        "jnp.linalg.svd of the rows (XLA)": lambda: np.asarray(jx_svd(rows)) ** 2,
    }
    out = {"matrices": list(grams.shape), "gram_seconds": _best_of(
        lambda: np.stack([r.T @ r for r in rows])), "solvers": {}}
    for name, fn in solvers.items():
        ev = np.sort(fn(), axis=-1)  # also compiles the jitted ones before timing
        err = float(np.max(np.abs(ev - exact) / scale))
        out["solvers"][name] = {"seconds": _best_of(fn), "max_error_rel_to_largest": err,
                                "correct": err < 1e-5}
    best = min((v["seconds"], k) for k, v in out["solvers"].items() if v["correct"])
    out["fastest_correct_solver"] = best[1]
    out["floor_seconds"] = out["gram_seconds"] + best[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--ref_venv", default="/work/refvenv")
    ap.add_argument("--model_dir", default="/work/refdata/smollm2-135m-llama")
    ap.add_argument("--build_reference", action="store_true", help="make the reference venv and "
                    "converted folder first when missing")
    ap.add_argument("--skip_reference", action="store_true")
    args = ap.parse_args()
    W = default_gate_matrices()
    results = [time_ours(W, args.episodes, args.ratio, s) for s in ("layer", "episode")]
    floor = time_floor(W, np.asarray(results[0].pop("last_indices")))
    results[1].pop("last_indices")
    ref = None
    if args.build_reference and not args.skip_reference:
        build_reference(args.ref_venv, args.model_dir)
    if not args.skip_reference and reference_ready(args.ref_venv, args.model_dir):
        ref = time_reference(args.ref_venv, args.model_dir, args.episodes, args.ratio)
    for name, v in floor["solvers"].items():
        print(f"  eigenvalues, {name:>36}: {v['seconds']:.3f} s  (error {v['max_error_rel_to_largest']:.1e})")
    print(f"{'floor':>26}: {floor['floor_seconds']:8.3f} s/episode  (Gram {floor['gram_seconds']:.3f} s "
          f"+ {floor['fastest_correct_solver']})")
    for r in results:
        print(f"{r['impl']:>26}: {r['median_episode_seconds']:8.3f} s/episode  "
              f"(all: {', '.join(f'{s:.2f}' for s in r['episode_seconds'])}), "
              f"{r['median_episode_seconds'] / floor['floor_seconds']:.2f}x the floor")
    if ref is None:
        print(f"{'reference':>26}: not measured in this run (no venv at {args.ref_venv} or no "
              f"converted folder; --build_reference makes them)")
    else:
        print(f"{ref['impl']:>26}: {ref['median_episode_seconds']:8.3f} s/episode  "
              f"(all: {', '.join(f'{s:.2f}' for s in ref['episode_seconds'])}), "
              f"{ref['median_episode_seconds'] / floor['floor_seconds']:.2f}x the floor")
        for r in results:
            print(f"speed-up of {r['impl']} over the reference: "
                  f"{ref['median_episode_seconds'] / r['median_episode_seconds']:.1f}x")
    print(json.dumps({"load_avg": os.getloadavg(), "floor": floor, "reference": ref,
                      "results": results}))


if __name__ == "__main__":
    main()

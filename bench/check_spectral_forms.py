"""Do the faster spectral forms give the same rewards? Per-layer KS on the real default model.

Trains 20 episodes (seed 42, ratio 0.3) on the default model's gate matrices to get 20 episodes of
sampled actions, then computes every layer's KS statistic for each action four ways:
  xla_direct:   the form before the downdate: kept rows (fp32) -> W_S^T W_S -> XLA eigvalsh
  lapack_direct: the same Gram, eigenvalues by LAPACK's values-only driver (spectral.eigvalsh)
  xla_downdate / lapack_downdate: W^T W - W_R^T W_R (R: the dropped rows), then each solver
each against its own reference spectrum (computed the same way, as training does), and against
fp64 truth (float64 Grams and eigenvalues). Prints how many (episode, layer) KS values differ from
xla_direct's and from the fp64 ones, and the largest relative singular-value error of each form.

  .venv/bin/python bench/check_spectral_forms.py [--episodes=20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from prunenet_jax.formats import gguf as gguf_io  # noqa: E402
from prunenet_jax.method import episode, spectral, trainer

_HI = lax.Precision.HIGHEST


def _sv(g, solver):
    ev = jnp.linalg.eigvalsh(g) if solver == "xla" else spectral.eigvalsh(g)
    return jnp.sqrt(jnp.maximum(ev, 0.0))[..., ::-1]


def _forms(W, G):
    """Jitted (indices (L, k)) -> {form: (ref_sv (L, H), sliced sv (L, H))}."""
    I = W.shape[1]

    def layer(w, g, idx, form):
        solver, how = form.split("_")
        if how == "direct":
            ws = jnp.take(w, idx, axis=0)
            return _sv(jnp.einsum("ij,ik->jk", ws, ws, precision=_HI), solver)
        rest = jnp.take(w, spectral.dropped_rows(idx, I), axis=0)
        return _sv(g - jnp.einsum("ij,ik->jk", rest, rest, precision=_HI), solver)

    forms = ("xla_direct", "lapack_direct", "xla_downdate", "lapack_downdate")
    refs = {f: _sv(G, f.split("_")[0]) for f in forms}

    @jax.jit
    def run(S):
        return {f: lax.map(lambda a: layer(*a, f), (W, G, S)) for f in forms}

    return forms, refs, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()
    _, stack = gguf_io.gguf_gate_stack(gguf_io.default_model_path())
    W_host = np.asarray(stack[:], np.float32)
    L, I, H = W_host.shape
    result = trainer.train(W_host, episode.TrainConfig(ratio=args.ratio), num_episodes=args.episodes)
    W = jnp.asarray(W_host)
    G = jnp.einsum("lij,lik->ljk", W, W, precision=_HI)
    forms, refs, run = _forms(W, G)
    ks_fn = jax.jit(jax.vmap(spectral.ks_statistic))
    W64 = W_host.astype(np.float64)
    ref64 = np.linalg.svd(W64, compute_uv=False)
    ks = {f: [] for f in forms + ("fp64",)}
    rel_err = {f: 0.0 for f in forms}
    for m in result.history:
        S = np.asarray(m.indices)
        sv = run(jnp.asarray(S))
        rows = np.take_along_axis(W64, S[:, :, None], 1)  # fp64 truth via fp64 Grams (k > H)
        sv64 = np.sqrt(np.maximum(np.linalg.eigvalsh(np.swapaxes(rows, 1, 2) @ rows), 0))[:, ::-1]
        ks["fp64"].append(np.asarray(ks_fn(jnp.asarray(ref64, jnp.float32), jnp.asarray(sv64, jnp.float32))))
        for f in forms:
            ks[f].append(np.asarray(ks_fn(refs[f], sv[f])))
            rel_err[f] = max(rel_err[f], float(np.max(np.abs(np.asarray(sv[f]) - sv64) / sv64)))
    ks = {f: np.stack(v) for f, v in ks.items()}
    out = {"model": "default (SmolLM2-135M gate matrices)", "shape": [L, I, H],
           "k": int(result.history[0].indices.shape[1]), "episodes": len(result.history),
           "pairs": int(ks["fp64"].size),
           "differs_from_xla_direct": {f: int(np.sum(ks[f] != ks["xla_direct"])) for f in forms},
           "differs_from_fp64": {f: int(np.sum(ks[f] != ks["fp64"])) for f in forms},
           "max_abs_ks_diff_vs_xla_direct": {f: float(np.max(np.abs(ks[f] - ks["xla_direct"])))
                                             for f in forms},
           "max_rel_sv_error_vs_fp64": rel_err,
           "training_ks_equals_xla_direct": bool(np.array_equal(
               np.stack([m.ks for m in result.history]), ks["lapack_downdate"]))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Check tests/data/reference/episode_fixture.npz against independent numpy/scipy math.

Needs only numpy and scipy (runs in the project env or the reference venv):

    python bench/reference/check_fixture.py [path/to/episode_fixture.npz]

It documents, as executable statements, what each fixture array means (see also the .json next
to the fixture), and exits non-zero if anything does not hold.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(REPO, "tests", "data", "reference", "episode_fixture.npz")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def main(path: str) -> int:
    f = np.load(path)
    s = json.loads(str(f["settings_json"]))
    W = f["gate_w"].astype(np.float64)
    P, b, r = (f[k].astype(np.float64) for k in ("init_P", "init_b", "init_r"))
    L, I, H = W.shape
    k, gamma, lr = s["k"], s["gamma"], s["lr"]
    checks = []

    def check(name, ok, detail=""):
        checks.append(ok)
        print(("ok   " if ok else "FAIL ") + name + (f"  [{detail}]" if detail else ""))

    # policy forward: z = (W P^T + b) r = W (P^T r) + b.r
    z = W @ (P.T @ r)[:, 0] + float(b @ r[:, 0])
    err = np.abs(z - f["fp32_sample_z"]).max()
    check("fp32 z == W (P^T r) + b.r", err < 1e-5, f"max err {err:.2e}")
    err16 = np.abs(z[None] - f["sample_z"]).max()
    check("reference fp16 z ~ fp32 z", err16 < 5e-3 * max(1.0, np.abs(z).max()), f"max err {err16:.2e}")
    check("fp32 alpha == sigmoid(z)", np.abs(sigmoid(z) - f["fp32_sample_alpha"]).max() < 1e-6)

    # keep = sigmoid(log u - log(1-u) + z)
    u = f["sample_u"].astype(np.float64)
    keep = sigmoid(np.log(u[0]) - np.log1p(-u[0]) + z)
    err = np.abs(keep - f["fp32_sample_keep"]).max()
    check("fp32 keep == sigmoid(logit(u) + z)", err < 1e-5, f"max err {err:.2e}")
    keep_all = sigmoid(np.log(u) - np.log1p(-u) + z[None])
    err = np.abs(keep_all - f["sample_keep"]).max()
    check("reference keep (fp16 alpha) ~ fp32 formula", err < 2e-3, f"max err {err:.2e}")

    # actions
    idx = f["idx"]
    E = idx.shape[0]
    check("idx: k distinct sorted rows per layer",
          idx.shape == (E, L, k) and all(len(np.unique(idx[e, l])) == k for e in range(E) for l in range(L))
          and np.all(np.diff(idx, axis=-1) > 0))
    check("idx == sort(idx_raw)", np.array_equal(np.sort(f["idx_raw"], -1), idx))

    # reward: KS of singular values
    sv_ref = np.linalg.svd(W, compute_uv=False)
    check("sv_ref == svd(W)", np.abs(sv_ref - f["sv_ref"]).max() < 1e-4)
    ks_ok, ks_fix_ok, sv_ok = True, True, True
    for e in range(E):
        for l in range(L):
            sv_new = np.linalg.svd(W[l][idx[e, l]], compute_uv=False)
            sv_ok &= np.abs(sv_new - f["sv_new"][e, l]).max() < 1e-4
            # the KS statistic on the recorded float32 singular values is exact
            ks_fix_ok &= stats.ks_2samp(f["sv_ref"][l], f["sv_new"][e, l]).statistic == f["ks"][e, l]
            # and from float64 SVDs it agrees up to rare ties at ~1e-7 (one step of 1/n at most)
            ks_ok &= abs(stats.ks_2samp(sv_ref[l], sv_new).statistic - f["ks"][e, l]) <= 1.0 / min(I, H) + 1e-12
    check("sv_new == svd(W[idx])", bool(sv_ok))
    check("ks == ks_2samp(sv_ref, sv_new).statistic (recorded svs, exact)", bool(ks_fix_ok))
    check("ks from float64 svd within one 1/n step", bool(ks_ok))
    rew = np.where(f["ks"] == 0, 99999.0, 1.0 / f["ks"])
    check("reward == 1/ks", np.allclose(rew, f["reward"], rtol=0, atol=1e-12))
    disc = f["reward"] * gamma ** np.arange(L)[None]
    check("discounted == gamma^l * reward", np.allclose(disc, f["discounted"], rtol=1e-15))
    check("history rewards == sum of rewards", np.allclose(f["history_episode_rewards"], f["reward"].sum(1)))

    # loss pass (fresh noise): loss_l = -disc_l * sum_{i in S_l} log keep'_i
    lu = f["loss_u"].astype(np.float64)
    x = np.log(lu[0]) - np.log1p(-lu[0]) + z
    logkeep = log_sigmoid(x)
    loss = -np.array([logkeep[l][idx[0, l]].sum() for l in range(L)]) * f["discounted"][0]
    check("fp32 loss == -disc * sum log keep'[idx]", np.allclose(loss, f["fp32_loss"], rtol=1e-4),
          f"{loss[:2]} vs {f['fp32_loss'][:2]}")
    check("reference loss (fp16) ~ fp32 loss", np.allclose(f["loss"][0], f["fp32_loss"], rtol=2e-3))
    check("loss noise differs from sampling noise", not np.allclose(f["loss_u"], f["sample_u"]))
    check("history loss == mean of layer losses", np.allclose(f["history_episode_losses"], f["loss"].mean(1), rtol=1e-6))

    # analytic gradient, summed over layers (episode schedule)
    def grads(x, idx_e, disc_e, P, b, r):
        gP = np.zeros_like(P); gb = np.zeros_like(b); gr = np.zeros_like(r)
        for l in range(L):
            mask = np.zeros(I); mask[idx_e[l]] = 1.0
            g = -disc_e[l] * mask * (1.0 - sigmoid(x[l]))      # dloss/dz
            wg = W[l].T @ g                                     # (H,)
            gP += np.outer(r[:, 0], wg)
            gb += r[:, 0] * g.sum()
            gr[:, 0] += P @ wg + b * g.sum()
        return gP, gb, gr

    gP, gb, gr = grads(x, idx[0], f["discounted"][0], P, b, r)
    for n, g in (("P", gP), ("b", gb), ("r", gr)):
        ref = f[f"fp32_grad_{n}"]
        check(f"fp32 grad {n} == analytic", np.allclose(g, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max()))
    norm = np.sqrt(sum((g ** 2).sum() for g in (gP, gb, gr)))
    check("fp32 grad norm", abs(norm - f["fp32_grad_norm"]) < 1e-3 * norm, f"{norm:.4g}")

    # AdamW (torch defaults: betas .9/.999, eps 1e-8, weight_decay 0.01), first step, clip 1.0
    def adamw_first(p, g, lr=lr, wd=0.01, eps=1e-8):
        # bias-corrected m_hat = g, v_hat = g^2
        return p * (1 - lr * wd) - lr * g / (np.abs(g) + eps)

    c = min(1.0, 1.0 / (norm + 1e-6))
    for n, p0, g in (("P", P, gP), ("b", b, gb), ("r", r, gr)):
        exp = adamw_first(p0, g * c)
        check(f"fp32 episode-schedule AdamW step {n}", np.allclose(exp, f[f"fp32_episode_after_{n}"], atol=2e-6))

    # per-layer schedule, first step (layer 0 only, no clipping)
    mask = np.zeros(I); mask[idx[0, 0]] = 1.0
    g = -f["discounted"][0][0] * mask * (1.0 - sigmoid(x[0]))
    wg = W[0].T @ g
    g0 = {"P": np.outer(r[:, 0], wg), "b": r[:, 0] * g.sum(), "r": (P @ wg + b * g.sum())[:, None]}
    for n, p0 in (("P", P), ("b", b), ("r", r)):
        ref = f[f"fp32_layer_grad_{n}"][0]
        check(f"per-layer schedule step-0 grad {n}", np.allclose(g0[n], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max()))
        check(f"per-layer schedule step-0 AdamW {n}",
              np.allclose(adamw_first(p0, ref), f[f"fp32_layer_steps_{n}"][0], atol=2e-6))

    # the reference's real episode: GradScaler skips steps until no overflow
    st = f["step_called"]
    check("GradScaler halves scale on each skipped step",
          np.allclose(f["scale_after"][~st], f["loss_scale"][~st] / 2) and np.all(f["found_inf"][~st] == 1))
    if st[-1]:
        scale = f["loss_scale"][-1]
        gl = [f[f"fp32_last_grad_{n}"] for n in "Pbr"]
        gs = [f[f"step_grad_{n}"] for n in "Pbr"]
        nl = np.sqrt(sum((g_ ** 2).sum() for g_ in gl))
        ns = np.sqrt(sum((g_ ** 2).sum() for g_ in gs))
        cos = sum((a_ * b_).sum() for a_, b_ in zip(gl, gs)) / (nl * ns)
        check("reference step grad = clip(scale * g, 1) / scale  (norm == 1/scale)",
              abs(ns - 1.0 / scale) < 1e-3 / scale, f"|g_step|={ns:.3e}, 1/scale={1/scale:.3e}, |g_fp32|={nl:.3e}")
        check("reference step grad direction ~ fp32 grad", cos > 0.99, f"cos={cos:.5f}")
        for n, p0, g_ in zip("Pbr", (P, b, r), gs):
            exp = adamw_first(p0, g_.astype(np.float64))
            check(f"reference AdamW step {n} (first real step, fresh Adam state)",
                  np.allclose(exp, f[f"after_{n}"], atol=2e-6))
    be = s["best_episode"]
    best_is_init = all(np.array_equal(f[f"best_{n}"], f[f"init_{n}"]) for n in "Pbr")
    check("best policy = params after best episode's (possibly skipped) update",
          best_is_init == (not st[be]) if be < E else True, f"best_episode={be}")

    # compress: keep from the best policy, fresh noise
    Pb, bb, rb = (f[f"best_{n}"].astype(np.float64) for n in "Pbr")
    zb = np.einsum("lih,h->li", W, (Pb.T @ rb)[:, 0]) + float(bb @ rb[:, 0])
    cu = f["compress_u"].astype(np.float64)
    ck = sigmoid(np.log(cu) - np.log1p(-cu) + zb)
    check("compress keep ~ formula", np.abs(ck - f["compress_keep"]).max() < 2e-3)
    check("compress idx shape", f["compress_idx"].shape == (L, k))

    n_ok = sum(checks)
    print(f"{n_ok} passed, {len(checks) - n_ok} failed")
    return 0 if n_ok == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))

"""Export a test fixture from the authors' reference (efficient-pruners 0.1.0) run on a tiny
random LLaMA, by observing its own code path (see _capture.py), not by reimplementing it.

Runs inside the reference venv:

    /work/refvenv/bin/python bench/reference/export_fixture.py \
        [--out tests/data/reference/episode_fixture.npz]

Writes OUT (npz) and OUT with .json (settings, notes, key list). Deterministic.

What happens
------------
1. A tiny LlamaForCausalLM (4 layers, hidden 32, intermediate 48, torch seed 1234,
   initializer_range 0.25) is saved in float32 to a temp folder named "tiny-llama-*".
2. The reference's `PruneNet(PruningConfig(seed=42, lr=1e-3, gamma=0.99)).fit(folder, 0.3)` runs
   with its "episode" schedule (the only schedule the package implements): per episode, sample
   all layers, then sum the layer losses (one backward per layer into accumulated grads),
   clip_grad_norm_(1.0) on the *scaled* grads, GradScaler.step(AdamW), GradScaler.update().
   On CPU its GradScaler is enabled (init scale 65536) and the policy runs under fp16 autocast;
   the fp16 backward overflows, so GradScaler skips optimizer.step() (halving the scale) until
   the scale is small enough. The first run finds the first episode whose step is really taken
   (s); the recorded run uses num_episodes = s + 1, so the fixture holds E = s + 1 episodes:
   E-1 skipped steps, then one real AdamW step.
3. After fit (the reference reloads its best checkpoint), `torch.manual_seed(7)` and the
   reference's `compress(0.3)` are recorded.
4. "fp32 replays": the reference's own SparsityPredictor module (fp32, no autocast, no
   GradScaler), fed the recorded noise u of episode 0 through a patched torch.rand and the
   recorded indices/rewards, gives exact fp32 targets: z, alpha, keep, per-layer loss, summed
   gradient, the episode-schedule update (clip_grad_norm_ 1.0 + torch AdamW) and a per-layer
   schedule (one AdamW step per layer, in layer order, no clipping: the loop order of the
   paper's repository, whose clip_grad_norm_ comes after zero_grad and so does nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "reference", "episode_fixture.npz")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.25, tie_word_embeddings=False)
MODEL_SEED = 1234
SEED = 42
RATIO = 0.3
LR = 1e-3
GAMMA = 0.99
COMPRESS_SEED = 7
MAX_EPISODES = 20


def build_tiny_llama() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.float32)
    path = tempfile.mkdtemp(prefix="tiny-llama-")
    model.save_pretrained(path)
    return path


def run_reference(model_dir: str, episodes: int, compress_seed: int | None):
    """Run the reference's fit() (and optionally compress()) under the capture wrappers."""
    from _capture import Capture
    from efficient_pruners import PruneNet, PruningConfig

    cap = Capture()
    try:
        pruner = PruneNet(PruningConfig(num_episodes=episodes, learning_rate=LR, gamma=GAMMA, seed=SEED,
                                        save_dir=tempfile.mkdtemp(prefix="ref_ckpt_")))
        history = pruner.fit(model_dir, compression_ratio=RATIO)
        comp = None
        if compress_seed is not None:
            cap._new_episode()
            torch.manual_seed(compress_seed)
            compressed = pruner.compress(RATIO)
            comp = dict(cap.cur)
            comp["model_intermediate_size"] = compressed.config.intermediate_size
            comp["gate_shape"] = tuple(compressed.model.layers[0].mlp.gate_proj.weight.shape)
        best = {k: v.detach().float().numpy().copy() for k, v in
                (("P", pruner.policy_model.proj_intermediate.weight),
                 ("b", pruner.policy_model.proj_intermediate.bias),
                 ("r", pruner.policy_model.row_sparsities))}
    finally:
        cap.close()
    return cap, history, comp, best


@contextlib.contextmanager
def fixed_rand(values):
    """Make torch.rand return the given (I,) noise as the (I, 1) draw Uniform.sample asks for."""
    orig = torch.rand

    def rand(*args, **kwargs):
        v = torch.as_tensor(values, dtype=torch.float32)
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        return v.reshape(tuple(shape)).clone()

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = orig


def new_policy(init):
    from efficient_pruners.models.sparsity_predictor import SparsityPredictor

    I, H = init["P"].shape
    pol = SparsityPredictor(H, I)
    with torch.no_grad():
        pol.proj_intermediate.weight.copy_(torch.from_numpy(init["P"]))
        pol.proj_intermediate.bias.copy_(torch.from_numpy(init["b"]))
        pol.row_sparsities.copy_(torch.from_numpy(init["r"]))
    pol.train()
    return pol


def pol_params(pol):
    return (pol.proj_intermediate.weight.detach().numpy().copy(),
            pol.proj_intermediate.bias.detach().numpy().copy(),
            pol.row_sparsities.detach().numpy().copy())


def pol_grads(pol):
    return (pol.proj_intermediate.weight.grad.numpy().copy(),
            pol.proj_intermediate.bias.grad.numpy().copy(),
            pol.row_sparsities.grad.numpy().copy())


def fp32_replays(W, init, sample_u, loss_u, idx, discounted):
    """The reference's module and torch's AdamW/clip in fp32, on recorded noise and actions."""
    out = {}
    L = W.shape[0]
    pol = new_policy(init)
    zs, als, ks = [], [], []
    with torch.no_grad():
        for l in range(L):
            w = torch.from_numpy(W[l])
            with fixed_rand(sample_u[l]):
                keep = pol(w)
            zs.append((pol.proj_intermediate(w) @ pol.row_sparsities)[:, 0].numpy())
            als.append(pol.alpha.numpy())
            ks.append(keep.numpy())
    out["fp32_sample_z"] = np.stack(zs)
    out["fp32_sample_alpha"] = np.stack(als)
    out["fp32_sample_keep"] = np.stack(ks)

    def layer_loss(pol, l):
        w = torch.from_numpy(W[l])
        with fixed_rand(loss_u[l]):
            keep = pol(w)
        action = torch.from_numpy(idx[l])
        loss = -torch.gather(torch.log(keep), 0, action).sum() * discounted[l]
        return loss, keep

    # Episode schedule: sum of layer losses, clip 1.0, one AdamW step.
    pol = new_policy(init)
    opt = torch.optim.AdamW(pol.parameters(), lr=LR)
    losses, keeps = [], []
    for l in range(L):
        loss, keep = layer_loss(pol, l)
        loss.backward()
        losses.append(float(loss.item()))
        keeps.append(keep.detach().numpy())
    out["fp32_loss_keep"] = np.stack(keeps)
    out["fp32_loss"] = np.asarray(losses, dtype=np.float64)
    g = pol_grads(pol)
    out["fp32_grad_P"], out["fp32_grad_b"], out["fp32_grad_r"] = g
    norm = torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
    out["fp32_grad_norm"] = np.float64(norm.item())
    opt.step()
    opt.zero_grad()
    out["fp32_episode_after_P"], out["fp32_episode_after_b"], out["fp32_episode_after_r"] = pol_params(pol)

    # Per-layer schedule: one AdamW step per layer, in layer order, no clipping.
    pol = new_policy(init)
    opt = torch.optim.AdamW(pol.parameters(), lr=LR)
    steps = {k: [] for k in ("P", "b", "r", "gP", "gb", "gr")}
    losses = []
    for l in range(L):
        loss, _ = layer_loss(pol, l)
        loss.backward()
        losses.append(float(loss.item()))
        gP, gb, gr = pol_grads(pol)
        opt.step()
        opt.zero_grad()
        P, b, r = pol_params(pol)
        for k, v in zip(("P", "b", "r", "gP", "gb", "gr"), (P, b, r, gP, gb, gr)):
            steps[k].append(v)
    out["fp32_layer_loss"] = np.asarray(losses, dtype=np.float64)
    out["fp32_layer_grad_P"] = np.stack(steps["gP"])
    out["fp32_layer_grad_b"] = np.stack(steps["gb"])
    out["fp32_layer_grad_r"] = np.stack(steps["gr"])
    out["fp32_layer_steps_P"] = np.stack(steps["P"])
    out["fp32_layer_steps_b"] = np.stack(steps["b"])
    out["fp32_layer_steps_r"] = np.stack(steps["r"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.disable(logging.INFO)

    import efficient_pruners
    import scipy
    import transformers

    model_dir = build_tiny_llama()

    # Dry run: find the first episode whose optimiser step GradScaler lets through.
    cap, _, _, _ = run_reference(model_dir, MAX_EPISODES, None)
    stepped = [i for i, e in enumerate(cap.episodes) if e.get("step_called")]
    first_step = stepped[0] if stepped else None
    n_ep = (first_step + 1) if first_step is not None else 1

    cap, history, comp, best = run_reference(model_dir, n_ep, COMPRESS_SEED)
    eps = cap.episodes
    assert len(eps) == n_ep, (len(eps), n_ep)
    init = cap.init_params
    L = len(eps[0]["sample_W"])
    W = np.stack(eps[0]["sample_W"]).astype(np.float32)
    I, H = W.shape[1:]
    k = int((1 - RATIO) * I)

    a = {}
    a["gate_w"] = W
    a["init_P"], a["init_b"], a["init_r"] = init["P"], init["b"], init["r"]

    def st(key, dtype=np.float32):
        return np.stack([np.stack(e[key]) for e in eps]).astype(dtype)

    for ph in ("sample", "loss"):
        for q in ("u", "z", "alpha", "keep"):
            a[f"{ph}_{q}"] = st(f"{ph}_{q}")
        assert np.array_equal(st(f"{ph}_W")[:, :, :, :], np.broadcast_to(W, (n_ep,) + W.shape))
    a["idx_raw"] = st("idx_raw", np.int64)
    a["idx"] = np.sort(a["idx_raw"], axis=-1)
    assert a["idx"].shape == (n_ep, L, k)
    assert np.array_equal(st("multinomial_probs"), a["sample_keep"])
    for e_i, e in enumerate(eps):
        for l in range(L):
            assert np.array_equal(e["pruned_W"][l], W[l][a["idx"][e_i, l]])
    a["sv_ref"] = np.stack(eps[0]["sv_ref"]).astype(np.float32)
    a["sv_new"] = st("sv_new")
    a["ks"] = st("ks", np.float64)
    a["reward"] = st("reward", np.float64)
    a["discounted"] = np.stack([e["discounted"] for e in eps]).astype(np.float64)
    a["loss"] = st("loss", np.float64)
    a["loss_scale"] = np.asarray([e["scale_before_step"] for e in eps], dtype=np.float64)
    a["found_inf"] = np.asarray([e["found_inf"] for e in eps], dtype=np.float64)
    a["scale_after"] = np.asarray([e["scale_after_update"] for e in eps], dtype=np.float64)
    a["step_called"] = np.asarray([bool(e.get("step_called")) for e in eps])
    a["clip_total_norm"] = np.asarray([e["clip_total_norm"] for e in eps], dtype=np.float64)
    last = eps[-1]
    if last.get("step_called"):
        for q in ("P", "b", "r"):
            a[f"step_grad_scaled_preclip_{q}"] = last["grad_preclip"][q]
            a[f"step_grad_{q}"] = last["grad_at_step"][q]
    for q in ("P", "b", "r"):
        a[f"after_{q}"] = last["params_end_of_episode"][q]
        a[f"best_{q}"] = best[q]
    a["history_episode_losses"] = np.asarray(history["episode_losses"], dtype=np.float64)
    a["history_episode_rewards"] = np.asarray([float(x) for x in history["episode_rewards"]], dtype=np.float64)
    best_episode = int(np.argmax(a["history_episode_rewards"]))  # first max wins (strict > in fit)

    # compress(RATIO) after torch.manual_seed(COMPRESS_SEED), with the reloaded best policy
    a["compress_u"] = np.stack(comp["sample_u"]).astype(np.float32)
    a["compress_z"] = np.stack(comp["sample_z"]).astype(np.float32)
    a["compress_keep"] = np.stack(comp["sample_keep"]).astype(np.float32)
    a["compress_idx"] = np.sort(np.stack(comp["idx_raw"]), axis=-1).astype(np.int64)

    a.update(fp32_replays(W, init, a["sample_u"][0], a["loss_u"][0], a["idx"][0], a["discounted"][0]))
    # fp32 summed gradient for the last recorded episode (the one whose step ran), at the params
    # it started from (still the initial ones: every earlier step was skipped).
    if first_step is not None:
        last_rep = fp32_replays(W, init, a["sample_u"][-1], a["loss_u"][-1], a["idx"][-1], a["discounted"][-1])
        assert all(np.array_equal(e["params_end_of_episode"][q], init[q]) for e in eps[:-1] for q in "Pbr")
        for q in ("P", "b", "r"):
            a[f"fp32_last_grad_{q}"] = last_rep[f"fp32_grad_{q}"]
        a["fp32_last_loss"] = last_rep["fp32_loss"]

    settings = {
        "source": "efficient-pruners==0.1.0 (PruneNet.fit / compress), observed via bench/reference/_capture.py",
        "versions": {"efficient_pruners": efficient_pruners.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "scipy": scipy.__version__,
                     "numpy": np.__version__},
        "model": {"type": "LlamaForCausalLM", **TINY, "torch_seed": MODEL_SEED, "dtype": "float32"},
        "L": L, "I": int(I), "H": int(H), "k": k,
        "ratio": RATIO, "lr": LR, "gamma": GAMMA, "seed": SEED, "use_kld": False,
        "optimizer": {"class": getattr(cap, "optimizer_class", "AdamW"), **(cap.optimizer_defaults or {})},
        "schedule": "episode: sum of layer losses (one backward per layer, grads accumulate), "
                    "clip_grad_norm_(1.0) on GradScaler-SCALED grads, GradScaler.step(AdamW) (skipped when "
                    "grads are non-finite), GradScaler.update(); one step per episode",
        "episodes_recorded": n_ep, "first_real_step_episode": first_step,
        "best_episode": best_episode,
        "best_params_note": "fit() saves the policy after the update of each episode whose total reward is "
                            "strictly higher than all before, then reloads it; best_* holds that policy",
        "compress_seed": COMPRESS_SEED,
        "gradscaler": {"enabled": bool(eps[0].get("scaler_enabled")), "init_scale": a["loss_scale"][0],
                       "backoff": 0.5, "growth_interval": 2000},
        "dtype_notes": {
            "autocast": "policy forward (sampling pass, loss pass, compress) runs under "
                        "torch.autocast('cpu', dtype=torch.float16)",
            "z": "proj_intermediate (nn.Linear) and the @ row_sparsities matmul run in float16: "
                 "z is float16 (stored widened to float32, exact)",
            "alpha": "sigmoid(z) in float16 (stored as float32, exact)",
            "u": "torch.rand float32 (Uniform(0,1).sample -> rsample -> torch.rand((I,1)))",
            "keep": "float32: log(u)-log(1-u) is float32, + log(alpha) - log(1-alpha) in float16 promoted "
                    "to float32, then sigmoid in float32",
            "multinomial_input": "float32 keep probabilities",
            "loss": "float32: -(log keep)[idx].sum() * discounted_reward(numpy float64 scalar)",
            "svd_ks": "torch.svd on float32 weights, scipy.stats.ks_2samp on float32 arrays; ks float64",
            "fp32_*": "replays with the reference's SparsityPredictor in float32, no autocast, no GradScaler, "
                      "fed episode 0's recorded u (patched torch.rand), idx and discounted rewards",
        },
        "keys": {},
    }
    descr = {
        "gate_w": "(L,I,H) float32 gate_proj.weight of every layer (policy state)",
        "init_P": "(I,H) policy proj_intermediate.weight at init", "init_b": "(I,) its bias",
        "init_r": "(I,1) row_sparsities at init",
        "sample_u": "(E,L,I) uniform noise drawn in the sampling pass",
        "sample_z": "(E,L,I) logits z (fp16 values)", "sample_alpha": "(E,L,I) sigmoid(z) (fp16 values)",
        "sample_keep": "(E,L,I) keep probs passed to torch.multinomial",
        "idx_raw": "(E,L,k) multinomial output (draw order)", "idx": "(E,L,k) sorted kept rows",
        "sv_ref": "(L,min(I,H)) singular values of the full gate_proj",
        "sv_new": "(E,L,min(k,H)) singular values of the sliced gate_proj",
        "ks": "(E,L) ks_2samp statistic", "reward": "(E,L) 1/ks", "discounted": "(E,L) gamma^l * reward",
        "loss_u": "(E,L,I) fresh noise drawn in the loss pass", "loss_z": "(E,L,I)", "loss_alpha": "(E,L,I)",
        "loss_keep": "(E,L,I) keep' used in the loss", "loss": "(E,L) per-layer loss values",
        "loss_scale": "(E,) GradScaler scale during the episode's backward",
        "found_inf": "(E,) 1 if GradScaler found inf/nan grads and skipped optimizer.step()",
        "scale_after": "(E,) scale after GradScaler.update()", "step_called": "(E,) AdamW.step() ran",
        "clip_total_norm": "(E,) norm returned by clip_grad_norm_ (of the SCALED grads; nan/inf when overflowed)",
        "step_grad_scaled_preclip_*": "grads (scaled by loss_scale) before clipping, last episode",
        "step_grad_*": "grads seen by AdamW.step in the last episode (clipped, then unscaled)",
        "after_*": "policy parameters at the end of the last recorded episode",
        "best_*": "policy parameters reloaded by fit() at the end (best total reward)",
        "history_episode_losses": "(E,) fit() history: mean over layers of loss.item()",
        "history_episode_rewards": "(E,) fit() history: sum over layers of reward (undiscounted)",
        "compress_u/z/keep/idx": "compress(ratio) after torch.manual_seed(compress_seed), best policy",
        "fp32_sample_z/alpha/keep": "(L,I) fp32 replay of episode 0's sampling-pass forward",
        "fp32_loss_keep": "(L,I) fp32 replay of episode 0's loss-pass keep'",
        "fp32_loss": "(L,) fp32 per-layer loss", "fp32_grad_*": "summed gradient (episode schedule, unclipped)",
        "fp32_grad_norm": "total grad norm before clipping",
        "fp32_last_grad_*": "fp32 summed gradient of the LAST recorded episode (its noise/idx/rewards)",
        "fp32_last_loss": "(L,) fp32 per-layer loss of the last recorded episode",
        "fp32_episode_after_*": "params after clip_grad_norm_(1.0) + one torch AdamW step (lr 1e-3, wd 0.01)",
        "fp32_layer_loss": "(L,) per-layer schedule: loss of layer l with the params after l steps",
        "fp32_layer_grad_*": "(L,...) per-layer schedule: grad at step l (no clipping)",
        "fp32_layer_steps_*": "(L,...) per-layer schedule: params after step l (AdamW, no clipping)",
    }
    settings["keys"] = descr
    settings["shapes"] = {k_: [list(v.shape), str(v.dtype)] for k_, v in a.items()}
    a["settings_json"] = np.asarray(json.dumps(settings))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **a)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as fh:
        json.dump(settings, fh, indent=1, default=float)
        fh.write("\n")
    print(json.dumps({"out": args.out, "bytes": os.path.getsize(args.out), "episodes": n_ep,
                      "first_real_step_episode": first_step, "loss_scale": a["loss_scale"].tolist(),
                      "best_episode": best_episode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

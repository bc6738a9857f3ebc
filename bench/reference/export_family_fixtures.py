"""Export per-family fixtures from the authors' reference (efficient-pruners 0.1.0): tiny random
OPT, Phi (phi-2 style) and Falcon (7B style) checkpoints, one episode of the reference's own
fit() and its compress(), observed through _capture.py (not reimplemented).

Runs inside the reference venv:

    /work/refvenv/bin/python bench/reference/export_family_fixtures.py [--out-dir DIR] [--probe-crashes]

Writes, per family NAME in (opt, phi, falcon), under DIR (default tests/data/reference/families):
  tiny-NAME/          the HF folder (config.json, generation_config.json, model.safetensors fp32)
                      that the reference ran on; the folder name holds the substring the
                      reference picks the family by ("opt", "phi", "falcon": see model_utils.py)
  NAME.npz            the episode and compress() arrays (keys documented in NAME.json)
  NAME.json           settings, the reference's module names per role, key descriptions
Deterministic: a second run writes byte-identical files.

What the reference does per family (efficient_pruners/utils/model_utils.py), by a substring of
the model PATH, tested in the order opt, phi, llama, falcon:
  opt:    layers model.decoder.layers; scores fc1.weight; slices fc1 rows + fc1.bias, fc2 columns
          (fc2.bias kept); policy width config.ffn_dim
  phi:    layers model.layers; scores mlp.fc1.weight; slices mlp.fc1 rows + bias, mlp.fc2 columns
          (mlp.fc2.bias kept); width config.intermediate_size
  falcon: layers transformer.h (no `.model` on FalconForCausalLM); scores
          mlp.dense_h_to_4h.weight; slices its rows and dense_4h_to_h columns, NEVER a bias:
          with bias=True the compressed model keeps a full-width dense_h_to_4h.bias and its
          forward fails (--probe-crashes prints the error); width config.ffn_hidden_size
  llama:  gate_proj scored; gate/up rows, down columns (no biases): export_fixture.py's fixture

--probe-crashes additionally runs fit(1 episode)+compress(0.3)+one forward on a tiny Falcon with
bias=True and on a tiny Phi-3 (folder "tiny-phi3": the "phi" branch), and prints what fails
(nothing is written for them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "reference", "families")

SEED = 42  # PruningConfig(seed) -> policy init
RATIO = 0.3
LR = 1e-3  # export_fixture.fp32_replays uses its own LR, the same 1e-3
GAMMA = 0.99
COMPRESS_SEED = 7
TOKENS_SEED = 3
DETECT_ORDER = ("opt", "phi", "llama", "falcon")  # the reference's if/elif order

# model_type, config overrides, torch seed, and the reference's module names (HF, per layer) for
# the scored (first, row-sliced) FFN matrix and the second (column-sliced) one.
FAMILIES = {
    "opt": dict(
        model_type="opt", seed=1301,
        config=dict(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                    activation_function="relu", enable_bias=True, do_layer_norm_before=True,
                    tie_word_embeddings=True),
        layer="model.decoder.layers.{}.", up="fc1", down="fc2", width_key="ffn_dim"),
    "phi": dict(
        model_type="phi", seed=1302,
        config=dict(vocab_size=100, hidden_size=40, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.4,
                    hidden_act="gelu_new", max_position_embeddings=64, tie_word_embeddings=False,
                    qk_layernorm=False),
        layer="model.layers.{}.", up="mlp.fc1", down="mlp.fc2", width_key="intermediate_size"),
    "falcon": dict(
        model_type="falcon", seed=1303,
        config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                    bias=False, alibi=False, max_position_embeddings=64),
        layer="transformer.h.{}.", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h",
        width_key="ffn_hidden_size"),
}


def detected_family(path: str) -> str | None:
    low = path.lower()
    return next((f for f in DETECT_ORDER if f in low), None)


def build_model(model_type: str, config: dict, seed: int):
    """A random fp32 model whose every parameter (norms and biases too) is non-trivial, as
    tests/tiny_models.py makes them."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("transformer.ln_f."):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.float().eval()


def save_folder(model, folder: str) -> None:
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)


def run_reference(folder: str, tokens: np.ndarray, stage: list | None = None):
    """fit(1 episode) + compress(RATIO) of the reference under the capture wrappers, then one
    forward of the compressed model. Returns (capture, history, compress record, pruner,
    compressed model, its logits). `stage` (a list) gets the name of the step being run."""
    stage = [] if stage is None else stage
    stage.append("fit")
    from _capture import Capture
    from efficient_pruners import PruneNet, PruningConfig

    cap = Capture()
    try:
        pruner = PruneNet(PruningConfig(num_episodes=1, learning_rate=LR, gamma=GAMMA, seed=SEED,
                                        save_dir=tempfile.mkdtemp(prefix="ref_ckpt_")))
        history = pruner.fit(folder, compression_ratio=RATIO)
        stage.append("compress")
        cap._new_episode()
        torch.manual_seed(COMPRESS_SEED)
        compressed = pruner.compress(RATIO)
        comp = dict(cap.cur)
    finally:
        cap.close()
    stage.append("forward of the compressed model")
    with torch.no_grad():
        logits = compressed(torch.as_tensor(tokens)).logits.float().numpy()
    return cap, history, comp, pruner, compressed, logits


def export_family(name: str, spec: dict, out_dir: str) -> dict:
    import efficient_pruners
    import scipy
    import transformers
    from export_fixture import fp32_replays
    from safetensors.numpy import load_file

    folder = os.path.join(out_dir, f"tiny-{name}")
    fam = detected_family(os.path.abspath(folder))
    if fam != name:
        raise SystemExit(f"the reference would treat {os.path.abspath(folder)!r} as {fam!r}, not "
                         f"{name!r} (it tests the substrings {DETECT_ORDER} in order); use --out-dir "
                         "elsewhere")
    model = build_model(spec["model_type"], spec["config"], spec["seed"])
    save_folder(model, folder)
    with torch.no_grad():
        tokens = np.random.default_rng(TOKENS_SEED).integers(3, spec["config"]["vocab_size"], (1, 8))
        full_logits = model(torch.as_tensor(tokens)).logits.float().numpy()

    cap, history, comp, pruner, compressed, logits = run_reference(os.path.abspath(folder), tokens)
    assert len(cap.episodes) == 1, len(cap.episodes)
    ep = cap.episodes[0]
    W = np.stack(ep["sample_W"]).astype(np.float32)
    L, I, H = W.shape
    k = int((1 - RATIO) * I)

    # The scored matrix the reference saw is the folder's first FFN matrix (checked on the file).
    st = load_file(os.path.join(folder, "model.safetensors"))
    lay, up, down = spec["layer"], spec["up"], spec["down"]
    for l in range(L):
        assert np.array_equal(W[l], st[lay.format(l) + up + ".weight"]), (name, l)
    assert I == getattr(model.config, spec["width_key"]), (I, spec["width_key"])

    a = {"scored_w": W}
    init = cap.init_params
    a["init_P"], a["init_b"], a["init_r"] = init["P"], init["b"], init["r"]
    one = lambda key, dtype=np.float32: np.stack(ep[key]).astype(dtype)
    for q in ("u", "z", "keep"):
        a[f"sample_{q}"] = one(f"sample_{q}")
    a["idx_raw"] = one("idx_raw", np.int64)
    a["idx"] = np.sort(a["idx_raw"], axis=-1)
    assert a["idx"].shape == (L, k)
    a["sv_ref"] = one("sv_ref")
    a["sv_new"] = one("sv_new")
    a["ks"] = np.asarray(ep["ks"], np.float64)
    a["reward"] = np.asarray(ep["reward"], np.float64)
    a["discounted"] = np.asarray(ep["discounted"], np.float64)
    a["loss_u"] = one("loss_u")
    a["loss"] = np.asarray(ep["loss"], np.float64)
    for l in range(L):
        assert np.array_equal(ep["pruned_W"][l], W[l][a["idx"][l]])
        assert np.array_equal(ep["loss_W"][l], W[l])
    stepped = bool(ep.get("step_called"))
    after = ep["params_end_of_episode"]
    if stepped:
        for q in "Pbr":
            a[f"after_{q}"] = after[q]
    else:  # GradScaler skipped the step (fp16 overflow at scale 65536): the policy is unchanged
        assert all(np.array_equal(after[q], init[q]) for q in "Pbr")
    best_P = pruner.policy_model.proj_intermediate.weight.detach().numpy()
    assert np.array_equal(best_P, after["P"])  # one episode: the best policy is the only one

    rep = fp32_replays(W, init, a["sample_u"], a["loss_u"], a["idx"], a["discounted"])
    a["fp32_sample_z"] = rep["fp32_sample_z"]
    a["fp32_loss"] = rep["fp32_loss"]
    for q in "Pbr":
        a[f"fp32_grad_{q}"] = rep[f"fp32_grad_{q}"]
        a[f"fp32_episode_after_{q}"] = rep[f"fp32_episode_after_{q}"]
        a[f"fp32_layer_after_{q}"] = rep[f"fp32_layer_steps_{q}"][-1]
    a["fp32_grad_norm"] = rep["fp32_grad_norm"]
    a["fp32_layer_loss"] = rep["fp32_layer_loss"]

    # compress(RATIO) after torch.manual_seed(COMPRESS_SEED)
    a["compress_u"] = np.stack(comp["sample_u"]).astype(np.float32)
    a["compress_keep"] = np.stack(comp["sample_keep"]).astype(np.float32)
    a["compress_idx"] = np.sort(np.stack(comp["idx_raw"]), axis=-1).astype(np.int64)
    sd = {n: t.detach().float().numpy() for n, t in compressed.state_dict().items()}
    names = {"up_w": up + ".weight", "up_b": up + ".bias", "down_w": down + ".weight",
             "down_b": down + ".bias"}
    sliced_names = {}
    for role, suffix in names.items():
        full = [lay.format(l) + suffix for l in range(L)]
        if full[0] not in sd:
            continue
        a[f"sliced_{role}"] = np.stack([sd[n] for n in full])
        sliced_names[role] = lay + suffix
    # What compress() did, checked on the folder's tensors: rows of up (+ its bias), columns of
    # down, down's bias untouched, every other tensor untouched.
    ci = a["compress_idx"]
    for l in range(L):
        p = lay.format(l)
        assert np.array_equal(a["sliced_up_w"][l], st[p + up + ".weight"][ci[l]])
        assert np.array_equal(a["sliced_down_w"][l], st[p + down + ".weight"][:, ci[l]])
        if "up_b" in sliced_names:
            assert np.array_equal(a["sliced_up_b"][l], st[p + up + ".bias"][ci[l]])
        if "down_b" in sliced_names:
            assert np.array_equal(a["sliced_down_b"][l], st[p + down + ".bias"])
    sliced = {lay.format(l) + names[r] for r in sliced_names for l in range(L)}
    untouched = [n for n in st if n not in sliced]
    assert all(np.array_equal(sd[n], st[n]) for n in untouched)
    width_after = int(compressed.state_dict()[lay.format(0) + up + ".weight"].shape[0])
    a["tokens"] = tokens.astype(np.int64)
    a["full_logits"] = full_logits
    a["compressed_logits"] = logits

    settings = {
        "source": "efficient-pruners==0.1.0 (PruneNet.fit 1 episode, compress), observed via "
                  "bench/reference/_capture.py; written by bench/reference/export_family_fixtures.py",
        "versions": {"efficient_pruners": efficient_pruners.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "scipy": scipy.__version__,
                     "numpy": np.__version__},
        "family": name, "folder": f"tiny-{name}",
        "model": {"model_type": spec["model_type"], **spec["config"], "torch_seed": spec["seed"],
                  "dtype": "float32", "init": "norm weights/biases 1+0.2*randn, all else 0.2*randn"},
        "reference_modules": {"layers": lay, "scored": up + ".weight", "row_sliced": up,
                              "column_sliced": down, "policy_width": "config." + spec["width_key"],
                              "biases_sliced": [up + ".bias"] if "up_b" in sliced_names else [],
                              "biases_kept": [down + ".bias"] if "down_b" in sliced_names else []},
        "sliced_names": sliced_names,
        "L": L, "I": int(I), "H": int(H), "k": k, "ratio": RATIO, "lr": LR, "gamma": GAMMA,
        "seed": SEED, "compress_seed": COMPRESS_SEED, "use_kld": False,
        "step_called": stepped, "found_inf": float(ep.get("found_inf", 0.0)),
        "loss_scale": float(ep["scale_before_step"]),
        "history_episode_rewards": [float(x) for x in history["episode_rewards"]],
        "width_key": spec["width_key"], "ffn_width_before": int(I), "ffn_width_after": width_after,
        "config_width_after": int(getattr(compressed.config, spec["width_key"])),
        "keys": {
            "scored_w": "(L,I,H) the matrix the reference scores (get_layer_weight), per layer",
            "init_P/b/r": "policy at init: proj_intermediate.weight (I,H), .bias (I,), row_sparsities (I,1)",
            "sample_u/z/keep": "(L,I) sampling-pass noise, fp16 logits, keep probs (torch.multinomial input)",
            "idx_raw": "(L,k) multinomial output (draw order)", "idx": "(L,k) sorted kept rows",
            "sv_ref": "(L,min(I,H)) singular values of the full scored matrix (torch.svd fp32)",
            "sv_new": "(L,min(k,H)) singular values of scored_w[l][idx[l]]",
            "ks/reward/discounted": "(L,) ks_2samp statistic, 1/ks, gamma^l * reward",
            "loss_u": "(L,I) fresh noise of the loss pass", "loss": "(L,) the reference's fp16-autocast loss",
            "after_P/b/r": "policy after the episode; only present when GradScaler let the step through "
                           "(else it equals init: see step_called)",
            "fp32_*": "the reference's SparsityPredictor in fp32 fed sample_u/loss_u/idx/discounted "
                      "(export_fixture.fp32_replays): z, per-layer loss, summed grads, episode schedule "
                      "(clip 1.0 + AdamW) params, per-layer schedule final params and losses",
            "compress_u/keep/idx": "(L,I)/(L,I)/(L,k) compress(ratio) after torch.manual_seed(compress_seed)",
            "sliced_up_w/up_b/down_w/down_b": "the compressed model's FFN tensors, stacked over layers; "
                                              "HF names in sliced_names ({} = layer)",
            "tokens/full_logits/compressed_logits": "(1,8) input ids; logits of the folder's model and "
                                                    "of the reference's compressed model",
        },
    }
    settings["shapes"] = {k_: [list(v.shape), str(v.dtype)] for k_, v in a.items()}
    npz = os.path.join(out_dir, f"{name}.npz")
    np.savez_compressed(npz, **a)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(settings, fh, indent=1, sort_keys=False)
        fh.write("\n")
    sizes = {os.path.relpath(os.path.join(dp, f), out_dir): os.path.getsize(os.path.join(dp, f))
             for dp, _, fs in os.walk(folder) for f in fs}
    return {"family": name, "npz_bytes": os.path.getsize(npz), "folder_bytes": sum(sizes.values()),
            "L": L, "I": int(I), "H": int(H), "k": k, "width_after": width_after,
            "config_width_after": settings["config_width_after"], "step_called": stepped,
            "rewards": a["reward"].round(4).tolist()}


def probe(label: str, model_type: str, config: dict, folder_name: str) -> None:
    """fit(1)+compress+forward on a model the reference is reported to fail on; print the error."""
    tmp = tempfile.mkdtemp(prefix="probe_")
    folder = os.path.join(tmp, folder_name)
    stage = ["build"]
    try:
        model = build_model(model_type, config, 0)
        save_folder(model, folder)
        tokens = np.arange(3, 11)[None]
        run_reference(folder, tokens, stage)
        print(json.dumps({"probe": label, "detected_family": detected_family(folder),
                          "result": "fit, compress and a forward ran without error"}))
    except Exception as e:  # noqa: BLE001 - the point is to report it
        tb = traceback.extract_tb(e.__traceback__)
        where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tb[-3:]]
        print(json.dumps({"probe": label, "detected_family": detected_family(folder),
                          "failed_in": stage[-1], "error": f"{type(e).__name__}: {e}",
                          "where": where}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=DEFAULT_OUT)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--probe-crashes", action="store_true")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.families.split(","):
        print(json.dumps(export_family(name, FAMILIES[name], args.out_dir)))
    if args.probe_crashes:
        falcon = dict(FAMILIES["falcon"]["config"], bias=True)
        probe("falcon bias=True", "falcon", falcon, "tiny-falcon-bias")
        phi3 = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        probe("phi3", "phi3", phi3, "tiny-phi3")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reference half of the speed benchmark, and a train-once / prune-many run of the reference.

Runs inside the reference venv (bench/reference/make_venv.sh), on an HF model folder whose path
contains "llama" (bench/reference/convert_default.py makes one from the embedded default model).

Modes
-----
time   (default)  Train the reference policy (`PruneNet.fit`, its defaults: lr 1e-3, gamma 0.99,
                  seed 42, fp16 autocast, one AdamW step per episode) for N episodes and print ONE
                  JSON line on stdout:
                    {"impl": "reference", "episodes": N, "episode_seconds": [...],
                     "median_episode_seconds": ..., ...}
                  An episode's time runs from the end of the previous episode's log line (or from
                  the "Starting policy training" line) to its own log line: model deep-copy,
                  sampling + slicing + SVD + KS for every layer, the loss pass, the optimiser step.
                  Loading the model and the reference SVDs are reported apart (setup_seconds).

prune             Train one policy (default seed 42, 20 episodes, training ratio 0.3), then for
                  every ratio in --ratios and every sampling seed in --sample-seeds call the
                  reference's own `compress(ratio)` after `torch.manual_seed(sample_seed)`, and
                  save each pruned model's kept row indices per layer (the sorted output of the
                  reference's torch.multinomial call) to an .npz:
                    idx_r{ratio}_s{seed}  int64 (L, k)   k = int((1 - ratio) * I)
                    topk_r{ratio}         int64 (L, k)   top-k rows by the policy's alpha (the
                                                         reference's get_importance_scores, run
                                                         under the same fp16 autocast), sorted
                    episode_rewards, episode_losses, scale_before_step, found_inf, step_called
                  plus a JSON string `meta`. --save-policy also stores the best policy (P, b, r).

batch             Batch pruning as the reference does it (the other half of bench/bench_batch.py):
                  train the policy for --episodes (default 1: pruning time does not depend on
                  training), then for each of --num-checkpoints checkpoints (the same HF folder,
                  loaded again each time): load (`PruneNet._load_model`, i.e.
                  AutoModelForCausalLM.from_pretrained), load the tokenizer (AutoTokenizer), and
                  per ratio: `compress(ratio)`, set `config.intermediate_size` to the kept width
                  (compress leaves it stale), `save_pretrained` (safetensors) and the tokenizer's
                  `save_pretrained` into --out-dir (default: a temp dir, deleted). Prints ONE JSON
                  line: {"impl": "reference", "checkpoints": [{"load_seconds", "tokenizer_load_seconds",
                  "ratios": [{"ratio", "kept", "compress_seconds", "save_seconds",
                  "tokenizer_save_seconds"}, ...], "total_seconds", "peak_rss_mib",
                  "rss_after_release_mib"}, ...], "fit_seconds", ...}. peak_rss_mib is the
                  checkpoint's own peak (VmHWM, reset before it via /proc/self/clear_refs; null
                  where that is not allowed); fit_peak_rss_mib the peak before (fit), max_rss_mib
                  the largest of them (not ru_maxrss: started by vfork + exec from a big process,
                  a child's ru_maxrss starts at its parent's peak).

Examples
--------
  /work/refvenv/bin/python bench/reference/time_reference.py time --episodes 3
  /work/refvenv/bin/python bench/reference/time_reference.py prune --ratios 0.1,0.2,0.3 \
      --sample-seeds 0,1,2,3,4 --out /tmp/ref_prune.npz
  /work/refvenv/bin/python bench/reference/time_reference.py batch --num-checkpoints 3 \
      --ratios 0.1,0.2,0.3
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

DEFAULT_MODEL_DIR = "/work/refdata/smollm2-135m-llama"


class _EpisodeClock(logging.Handler):
    """Timestamps the reference's own log lines (no change to its code path)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.start = None
        self.marks = []
        self.svd_start = None
        self.svd_end = None

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()
        msg = record.getMessage()
        if msg.startswith("Computing reference SVDs"):
            self.svd_start = now
        elif msg.startswith("Computed SVDs"):
            self.svd_end = now
        elif msg.startswith("Starting policy training"):
            self.start = now
        elif msg.startswith("Episode "):
            self.marks.append(now)


def _install_scaler_log(log: dict) -> None:
    """Record GradScaler state per episode (the reference skips steps whose grads overflow)."""
    import torch

    Scaler = torch.amp.GradScaler
    orig_step, orig_update = Scaler.step, Scaler.update

    def step(self_, optimizer, *a, **k):
        log["scale_before_step"].append(float(self_.get_scale()) if self_.is_enabled() else 1.0)
        n0 = sum(int(s.get("step", 0)) if not hasattr(s.get("step", 0), "item") else int(s["step"].item())
                 for s in optimizer.state.values())
        out = orig_step(self_, optimizer, *a, **k)
        n1 = sum(int(s.get("step", 0)) if not hasattr(s.get("step", 0), "item") else int(s["step"].item())
                 for s in optimizer.state.values())
        log["step_called"].append(bool(n1 > n0))
        found = 0.0
        if self_.is_enabled():
            st = self_._per_optimizer_states[id(optimizer)]
            found = float(sum(v.item() for v in st["found_inf_per_device"].values()))
        log["found_inf"].append(found)
        return out

    def update(self_, *a, **k):
        out = orig_update(self_, *a, **k)
        log["scale_after_update"].append(float(self_.get_scale()) if self_.is_enabled() else 1.0)
        return out

    Scaler.step, Scaler.update = step, update


def _check_model_dir(model_dir: str) -> str:
    model_dir = os.path.abspath(model_dir)
    if "llama" not in model_dir.lower():
        sys.exit(f"error: {model_dir!r} must contain 'llama' (the reference selects the architecture by name)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        sys.exit(f"error: no HF model in {model_dir!r}; run bench/reference/convert_default.py first")
    return model_dir


def _fit(model_dir: str, episodes: int, ratio: float, seed: int, lr: float, quiet: bool):
    import torch
    from efficient_pruners import PruneNet, PruningConfig

    clock = _EpisodeClock()
    ep_logger = logging.getLogger("efficient_pruners.core")
    ep_logger.addHandler(clock)
    if quiet:
        # keep INFO records flowing to our handler, but do not print them
        for h in logging.getLogger().handlers:
            h.setLevel(logging.WARNING)
    scaler_log = {"scale_before_step": [], "step_called": [], "found_inf": [], "scale_after_update": []}
    _install_scaler_log(scaler_log)

    # fit() silently loads an existing checkpoint from save_dir: always use a fresh one.
    save_dir = tempfile.mkdtemp(prefix="prunenet_ref_")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    pruner = PruneNet(PruningConfig(num_episodes=episodes, learning_rate=lr, seed=seed, save_dir=save_dir))
    history = pruner.fit(model_dir, compression_ratio=ratio)
    t1 = time.perf_counter()
    ep_logger.removeHandler(clock)

    marks = [clock.start] + clock.marks
    episode_seconds = [b - a for a, b in zip(marks[:-1], marks[1:])]
    info = {
        "episode_seconds": [round(x, 3) for x in episode_seconds],
        "median_episode_seconds": round(statistics.median(episode_seconds), 3) if episode_seconds else None,
        "setup_seconds": round(clock.start - t0, 3),
        "svd_seconds": round(clock.svd_end - clock.svd_start, 3) if clock.svd_end else None,
        "fit_seconds": round(t1 - t0, 3),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(pruner.device),
        # other processes on the machine distort the timing: report the 1-min load average
        "loadavg_1min_start": round(load_start[0], 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    return pruner, history, scaler_log, info


def cmd_time(args) -> int:
    model_dir = _check_model_dir(args.model_dir)
    _, history, scaler_log, info = _fit(model_dir, args.episodes, args.ratio, args.seed, args.lr, quiet=True)
    out = {"impl": "reference", "episodes": args.episodes, **info, "ratio": args.ratio,
           "model_dir": model_dir,
           "episode_total_rewards": [float(x) for x in history.get("episode_rewards", [])],
           "steps_skipped_by_gradscaler": sum(1 for s in scaler_log["step_called"] if not s)}
    # `episode_seconds` and `median_episode_seconds` first, as the benchmark reads them.
    ordered = {k: out[k] for k in ("impl", "episodes", "episode_seconds", "median_episode_seconds")}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    print(json.dumps(ordered), flush=True)
    return 0


def cmd_prune(args) -> int:
    import numpy as np
    import torch

    model_dir = _check_model_dir(args.model_dir)
    pruner, history, scaler_log, info = _fit(model_dir, args.episodes, args.train_ratio, args.seed, args.lr,
                                             quiet=not args.verbose)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    seeds = [int(x) for x in args.sample_seeds.split(",") if x.strip()]

    captured = []
    orig_multinomial = torch.multinomial

    def multinomial(inp, num_samples, *a, **k):
        out = orig_multinomial(inp, num_samples, *a, **k)
        captured.append(out.detach().sort().values.cpu().numpy().astype(np.int64))
        return out

    from efficient_pruners.utils.model_utils import get_all_layers, get_layer_weight

    arrays = {}
    torch.multinomial = multinomial
    try:
        for ratio in ratios:
            for s in seeds:
                captured.clear()
                torch.manual_seed(s)
                model = pruner.compress(ratio)
                n_layers = len(get_all_layers(model_dir, model))
                assert len(captured) == n_layers, (len(captured), n_layers)
                idx = np.stack(captured)
                # sanity: the compressed model's gate_proj rows are those rows of the original
                w0 = get_layer_weight(model_dir, get_all_layers(model_dir, pruner.model)[0])
                w1 = get_layer_weight(model_dir, get_all_layers(model_dir, model)[0])
                assert torch.equal(w0[torch.from_numpy(idx[0])], w1)
                arrays[f"idx_r{ratio}_s{s}"] = idx
                del model
    finally:
        torch.multinomial = orig_multinomial

    # Deterministic alternative: top-k rows by alpha, using the reference's own
    # get_importance_scores under the same fp16 autocast as compress().
    policy = pruner.policy_model
    layers = get_all_layers(model_dir, pruner.model)
    with torch.no_grad(), torch.autocast(device_type=pruner.device.type, dtype=torch.float16):
        alphas = [policy.get_importance_scores(get_layer_weight(model_dir, l)).float() for l in layers]
    n_rows = alphas[0].shape[0]
    for ratio in ratios:
        k = int((1 - ratio) * n_rows)
        arrays[f"topk_r{ratio}"] = np.stack([a.topk(k).indices.sort().values.numpy() for a in alphas]).astype(np.int64)

    arrays["episode_rewards"] = np.asarray([float(x) for x in history.get("episode_rewards", [])])
    arrays["episode_losses"] = np.asarray([float(x) for x in history.get("episode_losses", [])])
    for key in ("scale_before_step", "found_inf", "scale_after_update"):
        arrays[key] = np.asarray(scaler_log[key], dtype=np.float64)
    arrays["step_called"] = np.asarray(scaler_log["step_called"], dtype=bool)
    if args.save_policy:
        arrays["policy_P"] = policy.proj_intermediate.weight.detach().float().numpy()
        arrays["policy_b"] = policy.proj_intermediate.bias.detach().float().numpy()
        arrays["policy_r"] = policy.row_sparsities.detach().float().numpy()
    rewards = arrays["episode_rewards"]
    meta = {
        "impl": "reference", "package": "efficient-pruners==0.1.0", "model_dir": model_dir,
        "episodes": args.episodes, "seed": args.seed, "lr": args.lr, "train_ratio": args.train_ratio,
        "ratios": ratios, "sample_seeds": seeds, "num_layers": int(len(layers)),
        "intermediate_size": int(n_rows),
        "best_episode": int(np.argmax(rewards)) if len(rewards) else None,
        "sampling": "torch.manual_seed(sample_seed) then PruneNet.compress(ratio) (fp16 autocast, fresh "
                    "uniform noise per layer, torch.multinomial without replacement, sorted)",
        **info,
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(json.dumps({"out": os.path.abspath(args.out), "keys": sorted(arrays),
                      "episode_rewards": rewards.tolist(), "steps_called": scaler_log["step_called"],
                      "median_episode_seconds": info["median_episode_seconds"]}), flush=True)
    return 0


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, MiB."""
    with open("/proc/self/status") as f:
        return round(int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024, 1)


def _reset_peak() -> bool:
    """Resets VmHWM (the peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cmd_batch(args) -> int:
    import torch
    from transformers import AutoTokenizer

    model_dir = _check_model_dir(args.model_dir)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    pruner, _, _, info = _fit(model_dir, args.episodes, max(ratios), args.seed, args.lr, quiet=True)
    pruner.model, pruner.reference_svds = None, None  # each checkpoint is loaded afresh below
    gc.collect()
    # VmHWM, not ru_maxrss: a child started by vfork + exec inherits its parent's ru_maxrss.
    fit_peak = _status_mib("VmHWM")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="prunenet_ref_batch_")
    results = []
    try:
        for n in range(args.num_checkpoints):
            torch.manual_seed(args.seed)
            can_reset = _reset_peak()
            t0 = time.perf_counter()
            pruner.config.model_name = model_dir
            pruner.model = pruner._load_model()  # AutoModelForCausalLM.from_pretrained, .eval()
            t1 = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            t2 = time.perf_counter()
            row = {"checkpoint": n, "load_seconds": round(t1 - t0, 3),
                   "tokenizer_load_seconds": round(t2 - t1, 3), "ratios": []}
            width = pruner.model.config.intermediate_size
            for r in ratios:
                a = time.perf_counter()
                model = pruner.compress(r)
                b = time.perf_counter()
                kept = int((1 - r) * width)  # compress's own num_keep
                model.config.intermediate_size = kept  # compress leaves the old width
                folder = os.path.join(out_dir, f"ckpt{n}", f"ratio_{r:g}", "hf")
                model.save_pretrained(folder)  # safetensors by default
                c = time.perf_counter()
                tokenizer.save_pretrained(folder)
                d = time.perf_counter()
                with open(os.path.join(folder, "config.json")) as f:
                    saved_width = json.load(f)["intermediate_size"]
                row["ratios"].append({"ratio": r, "kept": kept, "saved_intermediate_size": saved_width,
                                      "compress_seconds": round(b - a, 3),
                                      "save_seconds": round(c - b, 3),
                                      "tokenizer_save_seconds": round(d - c, 3)})
                del model
            row["total_seconds"] = round(time.perf_counter() - t0, 3)
            row["peak_rss_mib"] = _status_mib("VmHWM") if can_reset else None
            del tokenizer
            pruner.model = None
            gc.collect()
            row["rss_after_release_mib"] = _status_mib("VmRSS")
            results.append(row)
    finally:
        if not args.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    out = {"impl": "reference", "mode": "batch", "model_dir": model_dir, "ratios": ratios,
           "num_checkpoints": args.num_checkpoints, "checkpoints": results,
           "fit_episodes": args.episodes, "fit_seconds": info["fit_seconds"],
           "fit_peak_rss_mib": fit_peak,
           "max_rss_mib": max([fit_peak] + [r["peak_rss_mib"] or 0 for r in results]),
           "torch_threads": info["torch_threads"], "torch": info["torch"],
           "loadavg_1min_start": info["loadavg_1min_start"],
           "loadavg_1min_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    t = sub.add_parser("time", help="time N training episodes (default mode)")
    t.add_argument("--episodes", type=int, default=3)
    t.add_argument("--ratio", type=float, default=0.3)
    p = sub.add_parser("prune", help="train once, prune at several ratios/seeds, save kept indices")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--train-ratio", type=float, default=0.3)
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--sample-seeds", default="0,1,2,3,4")
    p.add_argument("--out", default="ref_prune_indices.npz")
    p.add_argument("--save-policy", action="store_true")
    p.add_argument("--verbose", action="store_true")
    b = sub.add_parser("batch", help="train once, then load/compress/save_pretrained N checkpoints")
    b.add_argument("--episodes", type=int, default=1)
    b.add_argument("--num-checkpoints", type=int, default=3)
    b.add_argument("--ratios", default="0.1,0.2,0.3")
    b.add_argument("--out-dir", default=None, help="keep the outputs here (default: temp, deleted)")
    for sp in (t, p, b):
        sp.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--lr", type=float, default=1e-3)
    argv = list(sys.argv[1:] if argv is None else argv)
    # `time_reference.py`, `time_reference.py 3` and `time_reference.py --episodes 3` mean mode "time".
    if not argv or argv[0] not in ("time", "prune", "batch", "-h", "--help"):
        if argv and argv[0].isdigit():
            argv = ["--episodes", argv[0]] + argv[1:]
        argv = ["time"] + argv
    args = ap.parse_args(argv)
    return {"time": cmd_time, "prune": cmd_prune, "batch": cmd_batch}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())

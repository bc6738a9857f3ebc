"""The accelerator check behind bench/device_check.sh; prints one JSON object.

Parts (each timed; a part that fails or runs past the deadline reports why and the rest go on):
  7b:     7B-shaped training (32 x 11008 x 4096, bf16 gate matrices), 20 episodes: seconds,
          first-episode (compile) seconds, steady seconds per episode, peak device memory
  ppl:    perplexity throughput (tokens/s) of the default model's architecture (SmolLM2-135M
          config, random weights: the weights cannot travel, the time does not depend on them)
  kept:   same-seed kept channels against the CPU run committed in bench/results/device_kept.npz
          (a default-shaped stack 30 x 1536 x 576 whose fp32 values are made from PCG64's raw bits,
          so they are bit-identical on every machine; 20 episodes, seed 42, ratio 0.3)
  recover: recovery fine-tuning throughput (tokens/s) on a 1B-shaped model (16 x 2048, I=8192
          pruned to 5734, vocab 32000, random weights): LoRA rank 16 distillation from the dense
          model, bf16 compute with fp32 master weights, 8 x 512 tokens per step, 5 timed steps
  70b:    70B-shaped training (80 x 28672 x 8192, bf16), 3 episodes, per-episode seconds, last
          because it is the longest; stopped after the deadline, skipped when the 7B part's
          timing says its setup and first episode cannot finish before it.
Each part prints its own JSON line when done; the last line holds them all.

  python bench/device_check.py                       # on the device (bench/device_check.sh)
  python bench/device_check.py --make_fixture        # here, on CPU: writes the kept fixture
  DEVICE_CHECK_TINY=1 python bench/device_check.py   # dry run of every part at tiny shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax.method import episode, sampling, trainer
from prunenet_jax.formats.layer_stack import LazyLayerStack  # noqa: E402

FIXTURE = os.path.join(ROOT, "bench", "results", "device_kept.npz")
TINY = os.environ.get("DEVICE_CHECK_TINY") == "1"
# SmolLM2-135M-Instruct (read from its GGUF with gguf_io.load_gguf_config)
DEFAULT_CONFIG = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, rms_norm_eps=1e-05, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


class Deadline(Exception):
    pass


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def random_bf16_stack(L: int, I: int, H: int) -> LazyLayerStack:
    """LLaMA-scale N(0, 0.02) gate matrices, made on the device a layer at a time."""
    make = jax.jit(lambda key: (0.02 * jax.random.normal(key, (I, H), jnp.float32)).astype(jnp.bfloat16))
    return LazyLayerStack((L, I, H), jnp.bfloat16,
                          lambda l: np.asarray(make(jax.random.key(l))))


def exact_stack(L: int, I: int, H: int) -> np.ndarray:
    """fp32 values in [-0.05, 0.05) from PCG64's raw 64-bit output (stable across numpy versions
    and machines): 24 bits per value, so every value is exact in fp32."""
    bits = np.random.PCG64(1234).random_raw(L * I * H) >> np.uint64(40)
    return ((bits.astype(np.float64) * 2.0**-24 - 0.5) * 0.1).astype(np.float32).reshape(L, I, H)


def timed_training(W, episodes: int, deadline: float) -> dict:
    seconds, t_prev = [], [time.perf_counter()]

    def on_episode(e, m):
        now = time.perf_counter()
        seconds.append(now - t_prev[0])
        t_prev[0] = now
        if now > deadline and e + 1 < episodes:
            raise Deadline(f"stopped after {e + 1} episodes at the deadline")

    t0 = time.perf_counter()
    out = {"shape": list(W.shape), "dtype": str(np.dtype(W.dtype)), "episodes_asked": episodes}
    try:
        result = trainer.train(W, episode.TrainConfig(ratio=0.3), num_episodes=episodes,
                             callback=on_episode)
        out["setup_seconds"] = result.setup_seconds  # placing W, Grams, reference spectra
        seconds = result.episode_seconds
    except Deadline as e:
        out["stopped"] = str(e)
    steady = seconds[1:] or seconds
    out.update(episodes_done=len(seconds), total_seconds=time.perf_counter() - t0,
               episode_seconds=seconds, first_episode_seconds=seconds[0] if seconds else None,
               steady_episode_seconds=statistics.median(steady) if steady else None,
               compile_seconds_est=(seconds[0] - statistics.median(steady)) if len(seconds) > 1 else None,
               peak_device_bytes=peak_device_bytes())
    return out


def ppl_throughput() -> dict:
    from flax import nnx

    from prunenet_jax.models.config import ModelConfig
    from prunenet_jax.models.decoder import CausalLM
    from prunenet_jax.perplexity import Scorer

    cfg = ModelConfig.from_hf(DEFAULT_CONFIG)
    if TINY:
        cfg = dataclasses.replace(cfg, num_hidden_layers=2, vocab_size=512)
    seq, batch, windows = (64, 2, 4) if TINY else (512, 8, 64)
    scorer = Scorer(CausalLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (windows, seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    t0 = time.perf_counter()
    scorer.nll(tokens[:batch], mask[:batch], batch)  # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, count = scorer.nll(tokens, mask, batch)
    s = time.perf_counter() - t0
    return {"config": "SmolLM2-135M (random weights)" + (" TINY" if TINY else ""),
            "seq_len": seq, "batch_size": batch, "tokens_scored": count, "seconds": s,
            "tokens_per_second": count / s, "compile_seconds": compile_s}


def recovery_throughput(steps: int = 5) -> dict:
    from flax import nnx

    from prunenet_jax.models.config import ModelConfig
    from prunenet_jax.models.decoder import CausalLM
    from prunenet_jax.recovery.config import RecoverConfig
    from prunenet_jax.recovery.fine_tune import Recovery

    shape = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                 rms_norm_eps=1e-05, rope_theta=500000.0, max_position_embeddings=4096,
                 tie_word_embeddings=True)
    if TINY:
        shape.update(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    dense_cfg = ModelConfig.from_hf(shape)
    pruned_cfg = dataclasses.replace(dense_cfg, intermediate_size=sampling.num_kept(
        dense_cfg.intermediate_size, 0.3))
    batch, seq = (2, 32) if TINY else (8, 512)
    cfg = RecoverConfig(steps=steps + 1, method="lora", objective="distill",
                        batch_size=batch, seq_len=seq, compute_dtype="bfloat16")
    rec = Recovery(CausalLM(pruned_cfg, rngs=nnx.Rngs(1)), CausalLM(dense_cfg, rngs=nnx.Rngs(0)), cfg)
    tokens = np.random.default_rng(0).integers(0, dense_cfg.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    t0 = time.perf_counter()
    float(rec.step(tokens, mask)["loss"])  # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [float(rec.step(tokens, mask)["loss"]) for _ in range(steps)]
    s = time.perf_counter() - t0
    trained = batch * (seq - 1) * steps
    return {"config": f"1B-shaped {shape['num_hidden_layers']} x {shape['hidden_size']}, I "
                      f"{dense_cfg.intermediate_size} -> {pruned_cfg.intermediate_size}" + (" TINY" if TINY else ""),
            "method": "lora rank 16, distill, bf16 compute", "tokens_per_step": batch * seq,
            "steps_timed": steps, "seconds": s, "tokens_per_second": trained / s,
            "compile_seconds": compile_s, "losses": losses, "peak_device_bytes": peak_device_bytes()}


def kept_channels(episodes: int = 20) -> dict:
    L, I, H = (4, 96, 32) if TINY else (30, 1536, 576)
    W = exact_stack(L, I, H)
    result = trainer.train(W, episode.TrainConfig(ratio=0.3), seed=42, num_episodes=episodes)
    best = jax.tree.map(np.asarray, result.state.best_params)
    k = sampling.num_kept(I, 0.3)
    from prunenet_jax.method import policy

    kept = np.asarray(sampling.topk_indices(policy.policy_logits(best, jnp.asarray(W)), k))
    indices = np.stack([m.indices for m in result.history])
    return {"episode_digests": action_digests(indices),
            "episode_ks": np.stack([m.ks for m in result.history]), "kept_topk": kept.astype(np.int16)}


def action_digests(indices: np.ndarray) -> np.ndarray:
    """(E, L, k) kept rows -> (E, L) short digests (the fixture stays small)."""
    E, L = indices.shape[:2]
    return np.array([[hashlib.sha256(np.asarray(indices[e, l], np.int32).tobytes()).hexdigest()[:16]
                      for l in range(L)] for e in range(E)])


def compare_kept(got: dict) -> dict:
    if TINY or not os.path.exists(FIXTURE):
        return {"compared": False, "why": "tiny dry run" if TINY else f"no fixture {FIXTURE}"}
    want = dict(np.load(FIXTURE))
    same_ep = got["episode_digests"] == want["episode_digests"]  # (E, L)
    return {"compared": True, "kept_topk_equal": bool(np.array_equal(got["kept_topk"], want["kept_topk"])),
            "episode_actions_equal": bool(same_ep.all()),
            "first_differing_episode": int(np.argmin(same_ep.all(axis=1))) if not same_ep.all() else None,
            "layers_with_differing_actions": int((~same_ep).sum()),
            "ks_equal": bool(np.array_equal(got["episode_ks"], want["episode_ks"]))}


def estimate_seconds(out: dict, L: int, H: int, episodes: int):
    """Setup + first episode of an (L, ., H) run, scaled from the 7B part's steady episode."""
    done = out.get("7b", {})
    if not done.get("steady_episode_seconds"):
        return None
    L7, _, H7 = done["shape"]
    per_layer = done["steady_episode_seconds"] / L7 * (H / H7) ** 3
    return 3 * per_layer * L  # reference spectra + Grams, then the first episode with compilation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make_fixture", action="store_true")
    ap.add_argument("--deadline_s", type=float, default=float(os.environ.get("DEVICE_CHECK_DEADLINE_S", 420)))
    ap.add_argument("--parts", default="7b,ppl,kept,recover,70b")
    args = ap.parse_args()
    if args.make_fixture:
        got = kept_channels()
        np.savez_compressed(FIXTURE, **got)
        print(f"wrote {FIXTURE} on {jax.devices()[0]}")
        return
    start = time.perf_counter()
    deadline = start + args.deadline_s
    out = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "tiny": TINY}
    shapes = {"7b": ((3, 256, 96), 3) if TINY else ((32, 11008, 4096), 20),
              "70b": ((3, 512, 160), 3) if TINY else ((80, 28672, 8192), 3)}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            if time.perf_counter() > deadline:
                raise Deadline("not started: past the deadline")
            if part in shapes:
                (L, I, H), episodes = shapes[part]
                need = estimate_seconds(out, L, H, episodes)
                if need is not None and time.perf_counter() + need > deadline + 60:
                    raise Deadline(f"skipped: setup + 1 episode estimated at {need:.0f} s from "
                                   "the 7B part (eigenvalues scale as H^3), past the deadline")
                out[part] = timed_training(random_bf16_stack(L, I, H), episodes, deadline)
            elif part == "ppl":
                out[part] = ppl_throughput()
            elif part == "kept":
                out[part] = compare_kept(kept_channels())
            elif part == "recover":
                out[part] = recovery_throughput()
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception as e:  # report and go on to the next part
            out[part] = {"error": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc(limit=3)[-1500:]}
        out[part]["part_seconds"] = time.perf_counter() - t0
        # each part's line as soon as it is done: a run killed later still reports it
        print(json.dumps({part: out[part]}, default=float), flush=True)
    out["total_seconds"] = time.perf_counter() - start
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()

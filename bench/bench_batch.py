"""Batch pruning, per checkpoint: load, prune at several ratios, write orbax + HF (safetensors).
Seconds per phase and peak RSS per checkpoint, to show where the time goes; against the reference
(efficient-pruners 0.1.0: from_pretrained, compress(ratio), save_pretrained) in its own venv.

  .venv/bin/python bench/bench_batch.py                                   # default GGUF x3
  .venv/bin/python bench/bench_batch.py --ref_checkpoints=3 \
      --checkpoints=default,default,default,$HF,$HF,$HF    # HF=/work/refdata/smollm2-135m-llama

Ours runs in this process, phase by phase as launch/batch_prune.py does (prune_run.prune_at_ratios,
without perplexity): sources.load_model, then per ratio prune.select_kept, prune.slice_weights,
orbax_format.save_model, hf_export.export_hf (with the tokenizer). The policy is the untrained
trainer.initial_params(seed, I, H): pruning time does not depend on training. The real launcher is
also timed end to end once (--launcher), and the reference's `batch` mode
(bench/reference/time_reference.py) on the converted HF folder (--reference).

Peak RSS per checkpoint is VmHWM reset before each checkpoint (/proc/self/clear_refs); max RSS
is the process's ru_maxrss so far; "RSS after" is VmRSS once the checkpoint is released.
The first checkpoint of the process includes JIT compilation of channel selection (one per
ratio); the summary uses medians over the later ones.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_episode import build_reference  # noqa: E402

PHASES = ("select", "slice", "orbax", "hf_export")


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def time_ours(checkpoints: list[str], ratios: list[float], out_dir: str, seed: int, mode: str) -> list[dict]:
    from prunenet_jax import prune, sources
    from prunenet_jax.formats import hf_export
    from prunenet_jax.formats import orbax as orbax_format
    from prunenet_jax.method import policy as policy_lib
    from prunenet_jax.method import trainer
    from prunenet_jax.models import registry
    from prunenet_jax.formats import run_dir
    from prunenet_jax.run.batch import output_names

    params = fingerprint = None
    rows = []
    gc.collect()
    print(f"RSS before the first checkpoint (imports done): {status_mib('VmRSS'):.0f} MiB")
    for name, source in zip(output_names(checkpoints), checkpoints):
        gc.collect()
        can_reset = reset_peak()
        t0 = time.perf_counter()
        weights = sources.load_model(source)
        row = {"checkpoint": name, "source": source, "kind": sources.resolve_source(source)[0],
               "load": time.perf_counter() - t0, "ratios": []}
        if params is None:  # untimed: an untrained policy; timing does not depend on training
            t_init = time.perf_counter()
            params = trainer.initial_params(seed, weights.config.intermediate_size, weights.config.hidden_size)
            fingerprint = policy_lib.fingerprint(params)
            t0 += time.perf_counter() - t_init
        for r in ratios:
            orbax_dir, hf_dir, _ = run_dir.output_dirs(os.path.join(out_dir, name), r)
            t = [time.perf_counter()]
            scored = weights.layers[registry.scored(weights.config)]
            kept = prune.select_kept(params, scored, r, mode, seed)
            t.append(time.perf_counter())
            pruned = prune.slice_weights(weights, kept)
            t.append(time.perf_counter())
            meta = {"source": source, "policy_fingerprint": fingerprint, "mode": mode, "seed": seed,
                    "ratio": r, "kept": int(kept.shape[1]), "params_before": weights.num_params(),
                    "params_after": pruned.num_params()}
            orbax_format.save_model(orbax_dir, pruned, meta, kept=kept, overwrite=True)
            t.append(time.perf_counter())
            hf_export.export_hf(pruned, hf_dir,
                                model_card=orbax_format.model_card_fields(meta), overwrite=True)
            t.append(time.perf_counter())
            row["ratios"].append({"ratio": r, "kept": int(kept.shape[1]),
                                  **{p: b - a for p, a, b in zip(PHASES, t[:-1], t[1:])}})
            del pruned
        row["total"] = time.perf_counter() - t0
        row["peak_rss_mib"] = status_mib("VmHWM") if can_reset else None
        row["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        del weights
        gc.collect()
        row["rss_after_mib"] = status_mib("VmRSS")
        rows.append(row)
    return rows


def time_gguf_tokenizer() -> float:
    """hf_export rebuilds the tokenizer from the GGUF file on every export of a GGUF source: the
    seconds of that rebuild alone (part of each hf_export time of a GGUF source)."""
    from prunenet_jax.formats import gguf_tokenizer
    from prunenet_jax import sources

    t0 = time.perf_counter()
    gguf_tokenizer.load_gguf_tokenizer(sources.resolve_source("default")[1])
    return time.perf_counter() - t0


def time_launcher(ratios: list[float], out_dir: str, seed: int) -> dict:
    """python -m launch.batch_prune --checkpoints=default,default,default ... --export_hf, once."""
    from prunenet_jax.formats import orbax as orbax_format
    from prunenet_jax.formats import gguf as gguf_format
    from prunenet_jax import sources
    from prunenet_jax.method import trainer

    cfg = gguf_format.load_gguf_config(sources.resolve_source("default")[1])
    policy = os.path.join(out_dir, "policy")
    orbax_format.save_policy(policy, trainer.initial_params(seed, cfg.intermediate_size, cfg.hidden_size),
                            {"seed": seed, "note": "untrained initial policy, for timing"})
    cmd = [sys.executable, "-m", "launch.batch_prune", "--checkpoints=default,default,default",
           f"--ratios={','.join(map(str, ratios))}", f"--policy={policy}",
           f"--out_dir={os.path.join(out_dir, 'out')}", "--export_hf", f"--seed={seed}"]
    # Measured one process removed from this one: a child started by vfork + exec from this big
    # process would inherit its ru_maxrss. /usr/bin/time -v, else a small python in between.
    if os.access("/usr/bin/time", os.X_OK):
        timed, pattern = ["/usr/bin/time", "-v"] + cmd, r"Maximum resident set size \(kbytes\): (\d+)"
    else:
        timed = [sys.executable, "-c", "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                 "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                 "file=sys.stderr); sys.exit(rc)"] + cmd
        pattern = r"maxrss_kb (\d+)"
    t0 = time.perf_counter()
    proc = subprocess.run(timed, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"launcher failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = int(re.search(pattern, proc.stderr).group(1)) / 1024
    return {"command": " ".join(cmd[1:]), "wall_seconds": wall, "peak_rss_mib": peak}


def time_reference(venv: str, model_dir: str, n: int, ratios: list[float]) -> dict:
    out = subprocess.run([os.path.join(venv, "bin", "python"),
                          os.path.join(ROOT, "bench/reference/time_reference.py"), "batch",
                          "--num-checkpoints", str(n), "--ratios", ",".join(map(str, ratios)),
                          "--model-dir", model_dir],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_ours(rows: list[dict]) -> None:
    print(f"{'checkpoint':<28} {'load':>6}  {'ratio':>5} {'select':>7} {'slice':>6} {'orbax':>6} "
          f"{'hf_exp':>6}  {'total':>6} {'peakRSS':>8} {'maxRSS':>7} {'RSSafter':>8}")
    for row in rows:
        label = f"{row['checkpoint']} ({row['kind']})"
        for i, r in enumerate(row["ratios"]):
            head = f"{label:<28} {row['load']:6.2f}" if i == 0 else " " * 35
            tail = (f"  {row['total']:6.2f} {row['peak_rss_mib'] or float('nan'):8.0f} "
                    f"{row['max_rss_mib']:7.0f} {row['rss_after_mib']:8.0f}") if i == 0 else ""
            print(f"{head}  {r['ratio']:5g} {r['select']:7.2f} {r['slice']:6.2f} {r['orbax']:6.2f} "
                  f"{r['hf_export']:6.2f}{tail}")
    print("(seconds; RSS in MiB: peak of this checkpoint, process max so far, after release)")


def print_reference(ref: dict) -> None:
    print(f"{'reference checkpoint':<22} {'load':>6} {'tok_ld':>6}  {'ratio':>5} {'compress':>8} "
          f"{'save':>6} {'tok_sv':>6}  {'total':>6} {'peakRSS':>8} {'RSSafter':>8}")
    for row in ref["checkpoints"]:
        for i, r in enumerate(row["ratios"]):
            head = (f"{row['checkpoint']:<22} {row['load_seconds']:6.2f} {row['tokenizer_load_seconds']:6.2f}"
                    if i == 0 else " " * 36)
            tail = (f"  {row['total_seconds']:6.2f} {row['peak_rss_mib'] or float('nan'):8.0f} "
                    f"{row['rss_after_release_mib']:8.0f}") if i == 0 else ""
            print(f"{head}  {r['ratio']:5g} {r['compress_seconds']:8.2f} {r['save_seconds']:6.2f} "
                  f"{r['tokenizer_save_seconds']:6.2f}{tail}")
    print(f"(reference fit, {ref['fit_episodes']} episode incl. load + SVDs: {ref['fit_seconds']:.1f} s, "
          f"not counted; its peak RSS {ref['fit_peak_rss_mib']:.0f} MiB)")


def steady(items: list) -> list:
    """Drop the process's first checkpoint (JIT compilation) when there are later ones."""
    return items[1:] if len(items) > 1 else items


def compare(rows: list[dict], ref: dict) -> dict:
    """Medians per phase (first checkpoint of each process left out), ours by source kind."""
    med = statistics.median
    rck = steady(ref["checkpoints"])
    rrat = [r for row in rck for r in row["ratios"]]
    theirs = {"load": med(row["load_seconds"] + row["tokenizer_load_seconds"] for row in rck),
              "select+slice": med(r["compress_seconds"] for r in rrat),
              "hf write": med(r["save_seconds"] + r["tokenizer_save_seconds"] for r in rrat)}
    theirs["prune+hf write per ratio"] = med(r["compress_seconds"] + r["save_seconds"] +
                                             r["tokenizer_save_seconds"] for r in rrat)
    theirs["prune+write per ratio"] = theirs["prune+hf write per ratio"]
    theirs["checkpoint total"] = med(row["total_seconds"] for row in rck)
    theirs["peak RSS MiB"] = med(row["peak_rss_mib"] or 0 for row in ref["checkpoints"])
    notes = {"load": "(reference: from_pretrained + AutoTokenizer)", "select+slice": "(reference: compress)",
             "hf write": "(reference: save_pretrained, model + tokenizer)",
             "prune+write per ratio": "(ours incl. orbax save; the reference writes no 2nd format)"}
    out = {}
    for kind in sorted({row["kind"] for row in rows}):
        mine = ([row for row in steady(rows) if row["kind"] == kind]
                or [row for row in rows if row["kind"] == kind])
        rat = [r for row in mine for r in row["ratios"]]
        ours = {"load": med(row["load"] for row in mine),
                "select+slice": med(r["select"] + r["slice"] for r in rat),
                "hf write": med(r["hf_export"] for r in rat),
                "prune+hf write per ratio": med(r["select"] + r["slice"] + r["hf_export"] for r in rat),
                "prune+write per ratio": med(sum(r[p] for p in PHASES) for r in rat),
                "checkpoint total": med(row["total"] for row in mine),
                "peak RSS MiB": med(row["peak_rss_mib"] or 0 for row in mine)}
        print(f"ours from {kind} ({len(mine)} checkpoints) vs reference from the HF folder ({len(rck)}); "
              "medians, first checkpoint of each process left out; ratio = reference / ours:")
        for k, v in ours.items():
            fmt = ".0f" if "RSS" in k else ".2f"
            unit = "" if "RSS" in k else " s"
            print(f"  {k:<25} ours {v:8{fmt}}{unit}, reference {theirs[k]:8{fmt}}{unit}, "
                  f"{theirs[k] / v if v else float('nan'):6.2f} x  {notes.get(k, '')}")
        out[kind] = {"ours": ours, "reference": theirs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="default,default,default",
                    help="comma list: 'default' (embedded GGUF) and/or HF folders")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mode", default="sample")
    ap.add_argument("--out_dir", default=None, help="keep outputs here (default: temp dir, deleted)")
    ap.add_argument("--ref_venv", default="/work/refvenv")
    ap.add_argument("--model_dir", default="/work/refdata/smollm2-135m-llama", help="reference's HF folder")
    ap.add_argument("--ref_checkpoints", type=int, default=None,
                    help="checkpoints for the reference (default: as many as --checkpoints)")
    for name, help_ in (("reference", "time the reference's batch mode"),
                        ("launcher", "time python -m launch.batch_prune end to end")):
        ap.add_argument(f"--{name}", dest=name, action="store_true", default=True, help=help_)
        ap.add_argument(f"--no{name}", dest=name, action="store_false")
    args = ap.parse_args()
    checkpoints = [s.strip() for s in args.checkpoints.split(",") if s.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_batch_")
    result = {"load_avg_start": os.getloadavg(), "ratios": ratios, "policy": "trainer.initial_params(seed) "
              "(untrained; pruning time does not depend on training)"}
    try:
        rows = time_ours(checkpoints, ratios, os.path.join(out_dir, "ours"), args.seed, args.mode)
        print_ours(rows)
        result["ours"] = rows
        if any(row["kind"] == "gguf" for row in rows):
            result["gguf_tokenizer_build_seconds"] = tok = time_gguf_tokenizer()
            print(f"of each GGUF hf_export: rebuilding the tokenizer from the .gguf takes {tok:.2f} s "
                  "(gguf_tokenizer.load_gguf_tokenizer, timed once more on its own)")
        if args.launcher:
            result["launcher"] = launch = time_launcher(ratios, os.path.join(out_dir, "launcher"), args.seed)
            print(f"launcher end to end: {launch['wall_seconds']:.2f} s, peak RSS "
                  f"{launch['peak_rss_mib']:.0f} MiB  ({launch['command']})")
    finally:
        if not args.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    if args.reference and os.path.exists(os.path.join(args.ref_venv, "bin", "python")):
        build_reference(args.ref_venv, args.model_dir)
        result["reference"] = ref = time_reference(args.ref_venv, args.model_dir,
                                                         args.ref_checkpoints or len(checkpoints), ratios)
        print_reference(ref)
        result["comparison"] = compare(rows, ref)
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Are two prune run folders the same outputs? For checking that a refactor keeps outputs bit for bit.

    python bench/compare_runs.py RUN_A RUN_B

Equal means: every HF file byte for byte (the model card's command line excepted: it names the
folder), every orbax model's arrays exactly, calibration.npz byte for byte, and each manifest
entry's ratio, kept width, parameters, mode and perplexity. orbax's own files are not compared
byte for byte (their chunk names are random). Prints what differs; exit code 1 if anything does.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunenet_jax.formats import orbax  # noqa: E402

MANIFEST_FIELDS = ("ratio", "kept", "params", "mode", "ppl", "status")


def _files(root: str, pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern), recursive=True)
                  if os.path.isfile(p))


def compare(a: str, b: str) -> list[str]:
    problems = []
    hf_a, hf_b = _files(a, "**/hf/**"), _files(b, "**/hf/**")
    if hf_a != hf_b:
        problems.append(f"HF files differ: {sorted(set(hf_a) ^ set(hf_b))[:8]}")
    for rel in sorted(set(hf_a) & set(hf_b)):
        da, db = (open(os.path.join(r, rel), "rb").read() for r in (a, b))
        if rel.endswith("README.md"):  # the command line names the run folder
            da, db = (d.replace(os.path.abspath(r).encode(), b"RUN") for d, r in ((da, a), (db, b)))
        if da != db:
            problems.append(f"{rel} differs")
    for rel in ("calibration.npz",):
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        if os.path.exists(pa) != os.path.exists(pb) or (
                os.path.exists(pa) and open(pa, "rb").read() != open(pb, "rb").read()):
            problems.append(f"{rel} differs")
    models = [os.path.relpath(p, a) for p in sorted(glob.glob(os.path.join(a, "**/orbax"), recursive=True))]
    for rel in models:
        wa, wb = orbax.load_model(os.path.join(a, rel)), orbax.load_model(os.path.join(b, rel))
        for group in ("globals", "layers"):
            ga, gb = getattr(wa, group), getattr(wb, group)
            for k in sorted(set(ga) | set(gb)):
                if k not in ga or k not in gb or not np.array_equal(np.asarray(ga[k]), np.asarray(gb[k])):
                    problems.append(f"{rel}: {group}[{k}] differs")
    ma, mb = (json.load(open(os.path.join(r, "manifest.json"))) for r in (a, b))
    if len(ma["outputs"]) != len(mb["outputs"]):
        problems.append("manifests list different numbers of outputs")
    for ea, eb in zip(ma["outputs"], mb["outputs"]):
        for k in MANIFEST_FIELDS:
            if ea.get(k) != eb.get(k):
                problems.append(f"manifest {ea.get('mode')} {ea.get('ratio')}: {k} {ea.get(k)} != {eb.get(k)}")
    print(f"compared {len(hf_a)} HF files, {len(models)} orbax models, {len(ma['outputs'])} manifest entries")
    return problems


if __name__ == "__main__":
    found = compare(sys.argv[1], sys.argv[2])
    print("\n".join(found) if found else "same outputs")
    sys.exit(1 if found else 0)

"""From a policy to outputs on disk: prune one loaded model at several ratios, write each sliced
model as an orbax checkpoint (and optionally an HF folder), and record it in manifest.json.

Shared by launch/prune.py (one model) and launch/batch_prune.py (many models, one policy).
Every output folder is written under a temporary name and renamed when complete, and the manifest
is rewritten atomically after each output, so an interrupted run is resumed by skipping the
entries marked "done" whose folders exist.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from prunenet_jax import prune
from prunenet_jax.formats import orbax as checkpoints
from prunenet_jax.run import atomic as outputs
from prunenet_jax.method import sampling
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.models import registry
from prunenet_jax.weights import ModelWeights

MANIFEST = "manifest.json"
DONE, FAILED = "done", "failed"


def ratio_dirname(ratio: float) -> str:
    return f"ratio_{ratio:g}"


class Manifest:
    """`manifest.json` of an --out_dir: run-level fields plus `"outputs"`, one entry per output
    with keys ratio, kept, params, ppl, orbax_dir, hf_dir (relative to the folder), status."""

    def __init__(self, folder: str, header: dict, *, resume: bool, name: str = MANIFEST):
        self.folder, self.path = folder, os.path.join(folder, name)
        old = read_manifest(self.path) if resume else None
        self.data = {**header, "outputs": old["outputs"] if old else []}

    def find(self, key: dict) -> Optional[dict]:
        return next((e for e in self.data["outputs"] if all(e.get(k) == v for k, v in key.items())),
                    None)

    def is_done(self, key: dict, made_by: dict) -> bool:
        """Done by the same policy and selection (`made_by`), and its folders are still there."""
        e = self.find(key)
        if not e or e["status"] != DONE or any(e.get(k) != v for k, v in made_by.items()):
            return False
        return all(os.path.isdir(os.path.join(self.folder, e[d]))
                   for d in ("orbax_dir", "hf_dir") if e.get(d))

    def record(self, entry: dict, key: dict) -> None:
        outs = self.data["outputs"]
        old = self.find(key)
        if old is None:
            outs.append(entry)
        else:
            outs[outs.index(old)] = entry
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        outputs.write_json(self.path, self.data)


def read_manifest(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError:
        return None  # written atomically, so only a foreign file can be broken: start afresh
    return data if isinstance(data, dict) and isinstance(data.get("outputs"), list) else None


def select_kept(params: dict, gate, ratio: float, mode: str, seed: int) -> np.ndarray:
    """Kept channels (L, k) at `ratio` for gate matrices (L, I, H) (host or device). The key
    depends on the seed and k only, so one seed gives the same channels whatever else the run
    does (fold_in 0 and 1 are training's)."""
    k = sampling.num_kept(gate.shape[1], ratio)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), k)
    return prune.select_channels(params, gate, k, mode, key)


def output_recipe(params: dict, mode: str, seed: int, export_hf: bool, torch_format: bool) -> dict:
    """What an output depends on besides the model and ratio: a manifest entry made with another
    recipe is stale and gets redone on resume."""
    return {"policy_fingerprint": policy_lib.fingerprint(params), "mode": mode, "seed": seed,
            "export_hf": export_hf, "torch_format": torch_format}


def prune_at_ratios(weights: ModelWeights, params: dict, ratios: list[float], *, mode: str,
                    seed: int, out_dir: Optional[str], manifest: Optional[Manifest],
                    export_hf: bool = False, torch_format: bool = False,
                    ppl_fn: Callable[[ModelWeights], Optional[float]] = lambda w: None,
                    card: Optional[dict] = None, key: Optional[dict] = None,
                    extra: Optional[dict] = None, on_output: Callable[[dict], None] = lambda e: None) -> list[dict]:
    """Prunes `weights` at every ratio; with `out_dir`, writes `<out_dir>/ratio_<r>/orbax` (and
    `/hf`) and records each output in `manifest` (entries matched by `key` plus the ratio; with a
    manifest that resumes, outputs already done are skipped; `extra` fields are recorded too).
    Returns the entries in ratio order."""
    key = key or {}
    card = card or {}
    dense_params = weights.num_params()
    rel = lambda p: os.path.relpath(p, manifest.folder) if manifest else p
    entries = []
    gate = None
    made_by = output_recipe(params, mode, seed, export_hf, torch_format)
    for r in ratios:
        if manifest is not None and manifest.is_done({**key, "ratio": r}, made_by):
            entries.append(manifest.find({**key, "ratio": r}))
            on_output(entries[-1])
            continue
        if gate is None:  # on the device once for all ratios (GBs on a 7B model)
            gate = jax.device_put(weights.layers[registry.GATE])
        kept = select_kept(params, gate, r, mode, seed)
        pruned = prune.slice_weights(weights, kept)
        k = int(kept.shape[1])
        meta = {**card, "policy_fingerprint": made_by["policy_fingerprint"], "mode": mode,
                "seed": seed, "ratio": r, "kept": k,
                "params_before": dense_params, "params_after": pruned.num_params()}
        entry = {**key, **(extra or {}), "ratio": r, "kept": k, "params": pruned.num_params(), "ppl": None,
                 "orbax_dir": None, "hf_dir": None, "status": DONE, **made_by}
        if out_dir is not None:
            folder = os.path.join(out_dir, ratio_dirname(r))
            checkpoints.save_model(os.path.join(folder, "orbax"), pruned, meta, kept=kept,
                                   overwrite=True)
            entry["orbax_dir"] = rel(os.path.join(folder, "orbax"))
            if export_hf:
                from prunenet_jax.formats import hf as hf_export  # imported on use: needs transformers only here

                hf_export.export_hf(pruned, os.path.join(folder, "hf"),
                                    model_card=checkpoints.model_card_fields(meta),
                                    torch_format=torch_format, overwrite=True)
                entry["hf_dir"] = rel(os.path.join(folder, "hf"))
        entry["ppl"] = ppl_fn(pruned)
        if manifest is not None:
            manifest.record(entry, {**key, "ratio": r})
        entries.append(entry)
        on_output(entry)
        del pruned
    return entries

"""The run folder (`--out_dir`) as one concept: its folder names and `manifest.json`.

    <out_dir>/manifest.json            run fields + "outputs": one OutputEntry per (checkpoint,) ratio
    <out_dir>/policy/                  the trained policy (orbax)
    <out_dir>/train_state/<episode>/   per-episode training state (orbax)
    <out_dir>/[<name>/][<mode>/]ratio_<r>/{orbax,hf,gguf}/   (<mode>/ only when a run has several modes)
    <out_dir>/[<name>/]calibration.npz, scores/       energy mode: calibration tokens, scores (orbax)
    <out_dir>/manifests/shard-<i>-of-<n>.json   batch shards (merged into manifest.json)

This module is the only writer and reader of the manifest: its keys and the status strings appear
nowhere else. It is rewritten atomically after every output, so an interrupted run is resumed by
skipping the entries marked done (by the same recipe) whose folders still exist.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic, json_files, run_lock

MANIFEST = "manifest.json"
POLICY = "policy"
TRAIN_STATE = "train_state"
ORBAX, HF, GGUF = "orbax", "hf", "gguf"
DONE, FAILED = "done", "failed"

# What an output depends on besides the model and ratio: an entry made with another recipe is
# stale and gets redone on resume.
RECIPE_FIELDS = ("policy_fingerprint", "mode", "seed", "export_hf", "torch_format", "recover_recipe",
                 "guard", "calibration", "export_gguf")
_FIXED = ("checkpoint", "ratio", "kept", "params", "ppl", "orbax_dir", "hf_dir", "gguf_dir",
          "status", "error")


# What to do about a damaged manifest: of a run being continued, and of a run folder read as input.
RESUME_FIX = ("the run's record of its outputs is damaged: restore it, or pass --overwrite to "
              "start the run afresh (its outputs are made again)")
INPUT_FIX = ("the run's record of its outputs is damaged: restore it, or pass the model folders "
             "(<run>/[<mode>/]ratio_<r>/orbax or hf) instead of the run folder")

# Names a batch item's folder must not take: they are the run folder's own.
RESERVED = (MANIFEST, POLICY, TRAIN_STATE, "manifests")


def check_resume(out_dir: Optional[str], resume: bool, overwrite: bool) -> None:
    """--resume continues the run in --out_dir (whose manifest, if any, must be readable);
    --overwrite replaces it: never both."""
    if resume and not out_dir:
        raise UserError("--resume needs --out_dir (the folder of the run to continue)")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out_dir and --overwrite replaces "
                        "it; pass only one")
    if resume:
        resumed_outputs(out_dir)  # a damaged manifest is refused before any work is done


def ratio_dirname(ratio: float) -> str:
    """`ratio_<r>`: the short form (`0.1`, `0.25`) when it reads back as the same float, else the
    shortest exact one (repr), so distinct ratios never share a folder."""
    short = f"{ratio:g}"
    return f"ratio_{short if float(short) == ratio else repr(float(ratio))}"


def format_ratio(ratio: Optional[float]) -> str:
    """A ratio as every table, legend, log line and name shows it: the short form (0.2, 0.25)
    when that is the number, else three decimals (a ratio measured from kept/width: 0.201);
    "-" for none."""
    if ratio is None:
        return "-"
    short = f"{ratio:g}"
    return short if float(short) == round(ratio, 3) else f"{ratio:.3f}"


def output_dirs(out_dir: str, ratio: float, mode: Optional[str] = None,
                root: Optional[str] = None) -> tuple[str, str, str]:
    """(orbax folder, HF folder, GGUF folder) of the output at `ratio` under `out_dir` (and
    `mode`'s folder, given when a run has several modes), proven to lie inside the run folder
    `root` (default `out_dir`)."""
    folder = os.path.join(out_dir, *([mode] if mode else []), ratio_dirname(ratio))
    check_inside(root or out_dir, folder)
    return os.path.join(folder, ORBAX), os.path.join(folder, HF), os.path.join(folder, GGUF)


def check_inside(root: str, path: str) -> None:
    """Refuses an output path that, once symlinks and `..` are resolved, is not where it reads
    (below the resolved run folder `root`): a link planted inside the run folder, or a name that
    climbs out of it, would otherwise send writes (and --overwrite's deletes) elsewhere."""
    real_root = os.path.realpath(root)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    expected = os.path.normpath(os.path.join(real_root, rel))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.realpath(path) != expected:
        raise UserError(f"output {path} resolves to {os.path.realpath(path)}, outside the run "
                        f"folder {real_root} (a symbolic link or '..' in the way); remove the "
                        "link or choose another --out_dir")


@dataclasses.dataclass
class OutputEntry:
    """One output of a run: a model pruned at `ratio` (of batch item `checkpoint`), or why not."""
    ratio: float
    status: str = DONE
    kept: Optional[int] = None
    params: Optional[int] = None
    ppl: Optional[float] = None
    orbax_dir: Optional[str] = None  # relative to the run folder
    hf_dir: Optional[str] = None
    gguf_dir: Optional[str] = None  # the folder holding the .gguf file (--export_gguf)
    checkpoint: Optional[str] = None  # the batch item's name; None in a one-model run
    error: Optional[str] = None  # status FAILED: the one-line message
    recipe: dict = dataclasses.field(default_factory=dict)  # RECIPE_FIELDS
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. source, dense_ppl

    @property
    def done(self) -> bool:
        return self.status == DONE

    def to_json(self) -> dict:
        d: dict[str, Any] = {} if self.checkpoint is None else {"checkpoint": self.checkpoint}
        d.update(self.extra)
        d.update(ratio=self.ratio, kept=self.kept, params=self.params, ppl=self.ppl,
                 orbax_dir=self.orbax_dir, hf_dir=self.hf_dir, status=self.status)
        if self.gguf_dir is not None:
            d["gguf_dir"] = self.gguf_dir
        if self.error is not None:
            d["error"] = self.error
        d.update(self.recipe)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "OutputEntry":
        """Reads entries of every manifest version: missing fields are None (an old entry lacks
        some recipe fields and so is redone), unknown ones are kept in `extra`."""
        return cls(**{k: d.get(k) for k in _FIXED if k != "status"}, status=d.get("status"),
                   recipe={k: d[k] for k in RECIPE_FIELDS if k in d},
                   extra={k: v for k, v in d.items() if k not in _FIXED and k not in RECIPE_FIELDS})


def recipe(fingerprint: Optional[str], mode: str, seed: int, export_hf: bool, torch_format: bool,
           recover: Optional[dict] = None, guard: bool = False,
           calibration: Optional[dict] = None, export_gguf: Optional[str] = None) -> dict:
    """The recipe fields. `recover` (the recovery fine-tune's settings), `guard`, `calibration`
    and `export_gguf` (the GGUF type) only when used, so entries made before they existed still
    match."""
    made = dict(zip(RECIPE_FIELDS, (fingerprint, mode, seed, export_hf, torch_format)))
    if recover is not None:
        made["recover_recipe"] = recover
    if guard:
        made["guard"] = True
    if calibration is not None:
        made["calibration"] = calibration
    if export_gguf:
        made["export_gguf"] = export_gguf
    return made


class Manifest:
    """`manifest.json` (or a shard's manifest) of a run folder: run-level fields (`header`) plus
    the outputs; with `resume` the outputs of an existing manifest are kept."""

    def __init__(self, folder: str, header: dict, *, resume: bool, name: str = MANIFEST,
                 by_mode: bool = False):
        """by_mode: the run has several modes, so an output is told apart by its mode too (in a
        one-mode run, outputs of every mode share the ratio's folder)."""
        self.folder, self.path, self.by_mode = folder, os.path.join(folder, name), by_mode
        self.header = dict(header)
        self.outputs = resumed_outputs(folder, name) if resume else []

    def find(self, ratio: float, checkpoint: Optional[str] = None,
             mode: Optional[str] = None) -> Optional[OutputEntry]:
        return next((e for e in self.outputs if e.ratio == ratio and e.checkpoint == checkpoint
                     and (not self.by_mode or e.recipe.get("mode") == mode)), None)

    def is_done(self, ratio: float, made_by: dict, checkpoint: Optional[str] = None) -> bool:
        """Done by the same recipe (`made_by`), and its folders are still there."""
        e = self.find(ratio, checkpoint, made_by.get("mode"))
        if not e or not e.done or any(e.recipe.get(k) != made_by.get(k) for k in RECIPE_FIELDS):
            return False
        return all(os.path.isdir(os.path.join(self.folder, d))
                   for d in (e.orbax_dir, e.hf_dir, e.gguf_dir) if d)

    def record(self, entry: OutputEntry) -> None:
        old = self.find(entry.ratio, entry.checkpoint, entry.recipe.get("mode"))
        if old is None:
            self.outputs.append(entry)
        else:
            self.outputs[self.outputs.index(old)] = entry
        self.save()

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.folder)

    def to_json(self) -> dict:
        return manifest_json(self.header, self.outputs)

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic.write_json(self.path, self.to_json())


def manifest_json(header: dict, entries: list[OutputEntry]) -> dict:
    """A manifest's JSON (also what launch.prune prints last): run fields + "outputs"."""
    return {**header, "outputs": [e.to_json() for e in entries]}


def resumed_outputs(folder: str, name: str = MANIFEST) -> list[OutputEntry]:
    """The outputs the manifest `name` of the run folder `folder` records, for a run that
    continues it ([] when there is none); a damaged one is a UserError naming it (a run must not
    silently start afresh over outputs it would then make again)."""
    path = os.path.join(folder, name)
    data = read_manifest(path, fix=RESUME_FIX)
    outputs = [OutputEntry.from_json(e) for e in data["outputs"]] if data else []
    for e in outputs:  # is_done joins their folders to the run folder
        check_entry(folder, path, e, RESUME_FIX)
    return outputs


def read_manifest(path: str, fix: Optional[str] = None) -> Optional[dict]:
    """The manifest's JSON, or None when there is none. One that is not a manifest (unreadable,
    not JSON, not an object with an "outputs" list of objects) is a UserError naming it and
    `fix`; without `fix`, None. (It is written atomically: only a foreign or damaged file can be
    broken.)"""
    if not os.path.isfile(path):
        return None
    try:
        data = json_files.read_json(path, fix=fix or "")
        outputs = data.get("outputs")
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise UserError(f"{path} is not a prune manifest (its 'outputs' is not a list of "
                            f"objects); {fix}")
    except UserError:
        if fix is None:
            return None
        raise
    return data


def check_entry(folder: str, manifest: str, entry: OutputEntry, fix: str) -> None:
    """Refuses an entry of `manifest` (of the run folder `folder`) that no run writes: a ratio
    that is not a number, a mode or checkpoint that is not a string, or a folder (orbax_dir,
    hf_dir) that is not a relative path inside the run folder: an absolute or `..` path, or one
    through a symbolic link out of it, would make a run read or skip folders elsewhere (also
    gguf_dir)."""
    where = f"{manifest}: the output at ratio {entry.ratio!r}"
    if entry.ratio is not None and (isinstance(entry.ratio, bool)
                                    or not isinstance(entry.ratio, (int, float))):
        raise UserError(f"{where}: its ratio is not a number; {fix}")
    for field, value in (("mode", entry.recipe.get("mode")), ("checkpoint", entry.checkpoint)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where} has {field}={value!r}, not a string; {fix}")
    for field in ("orbax_dir", "hf_dir", "gguf_dir"):
        problem = _outside(folder, getattr(entry, field))
        if problem:
            raise UserError(f"{where} has {field}={getattr(entry, field)!r}, {problem}; {fix}")


def _outside(folder: str, rel) -> Optional[str]:
    """Why the output folder `rel` (relative to the run folder `folder`) is not one inside it,
    or None (also for no folder)."""
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return "not a folder name"
    if os.path.isabs(rel) or os.pardir in rel.split(os.sep):
        return "not a path inside the run folder"
    root, real = os.path.realpath(folder), os.path.realpath(os.path.join(folder, rel))
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        return f"which resolves to {real}, outside the run folder (a symbolic link)"
    return None


def is_run_dir(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


@dataclasses.dataclass
class FinishedOutput:
    ratio: Optional[float]
    model_dir: str  # the HF export when there is one (lm-eval and transformers need it), else orbax
    hf_dir: Optional[str]
    mode: Optional[str] = None  # how its channels were selected (with " +guard" when guarded)
    recovery: Optional[dict] = None  # its recovery fine-tune's record (RECOVERY), if it had one
    orbax_dir: Optional[str] = None  # its orbax folder, when the manifest names one that exists
    source: Optional[str] = None  # the dense model it was pruned from, as the run recorded it
    checkpoint: Optional[str] = None  # the batch item's name; None in a one-model run
    mode_name: Optional[str] = None  # the mode alone (no " +guard")
    guard: bool = False


def finished_outputs(folder: str, strict: bool = True) -> list[FinishedOutput]:
    """The outputs a run folder lists as done, with folders joined to `folder`; a UserError when
    there are none or one's folder is missing. Not `strict`: [] for a folder without a readable
    manifest, and outputs whose folders are missing are left out."""
    path = os.path.join(folder, MANIFEST)
    try:
        data = read_manifest(path, fix=INPUT_FIX)
    except UserError:
        if strict:
            raise
        return []  # a run folder above the model folder named: that folder speaks for itself
    if data is None:
        if not strict:
            return []
        raise UserError(f"{path} is not a readable prune manifest; pass the --out_dir of a "
                        "finished launch.prune run")
    done = [OutputEntry.from_json(o) for o in data["outputs"]]
    done = [o for o in done if o.done]
    for o in done:
        check_entry(folder, path, o, INPUT_FIX)
    if not done and strict:
        raise UserError(f"{path} lists no finished output (status '{DONE}'); finish or resume "
                        "the prune run, or pass model folders")
    found = []
    for o in done:
        rel = o.hf_dir or o.orbax_dir
        model = os.path.join(folder, rel) if rel else None
        if model is None or not os.path.isdir(model):
            if not strict:
                continue
            raise UserError(f"{path}: the output at ratio {o.ratio} names folder {rel!r}, which "
                            "is missing; rerun the prune launcher with --resume")
        mode, guard = o.recipe.get("mode"), bool(o.recipe.get("guard"))
        orbax_dir = os.path.join(folder, o.orbax_dir) if o.orbax_dir else None
        # the dense source: a batch item's own, a prune run's --model, a recovery run's dense model
        source = o.extra.get("source") or data.get("model") or data.get("dense")
        found.append(FinishedOutput(None if o.ratio is None else float(o.ratio), model,
                                    os.path.join(folder, o.hf_dir) if o.hf_dir else None,
                                    f"{mode} +guard" if mode and guard else mode,
                                    o.extra.get(RECOVERY),
                                    orbax_dir if orbax_dir and os.path.isdir(orbax_dir) else None,
                                    source if isinstance(source, str) else None, o.checkpoint,
                                    mode, guard))
    return found


# ----------------------------------------------------------------------------- batch shards

def shard_manifest_name(index: int, count: int) -> str:
    return MANIFEST if count == 1 else f"manifests/shard-{index:05d}-of-{count:05d}.json"


def lock_name(index: int, count: int) -> str:
    """The run lock of one batch shard (files/run_lock.py); one shard locks the whole folder."""
    return run_lock.LOCK_FILE if count == 1 else f"{run_lock.LOCK_FILE}.shard-{index:05d}-of-{count:05d}"


def merge_manifests(out_dir: str, count: int) -> dict:
    """manifest.json listing the outputs of every shard manifest present, and which are missing;
    a damaged one is a UserError naming it."""
    merged, present, missing = None, [], []
    for i in range(count):
        fix = f"restore it, or rerun shard {i} (--shard_index={i}) with --overwrite"
        data = read_manifest(os.path.join(out_dir, shard_manifest_name(i, count)), fix=fix)
        if data is None:
            missing.append(i)
            continue
        present.append(i)
        if merged is None:
            merged = {k: v for k, v in data.items() if k not in ("shard_index", "outputs")}
            merged["outputs"] = []
        merged["outputs"] += data["outputs"]
    if merged is None:
        raise UserError(f"--merge: no shard manifests in {out_dir}/manifests; run the shards first")
    merged["shards"] = {"present": present, "missing": missing}
    atomic.write_json(os.path.join(out_dir, MANIFEST), merged)
    return merged


# ----------------------------------------------------------------------------- run-level fields

def prune_header(*, model: str, policy_dir: Optional[str], fingerprint: Optional[str], seed: int,
                 mode: str, train_ratio: Optional[float], dense_params: int, dense_ppl,
                 training: Optional[dict], command: str, **more) -> dict:
    """The run-level fields of a one-model run (launch.prune); `more`: e.g. guard, scores,
    dense_accuracy, random_baseline."""
    return {"model": model, "policy_dir": policy_dir, "policy_fingerprint": fingerprint,
            "seed": seed, "mode": mode, "train_ratio": train_ratio, "dense_params": dense_params,
            "dense_ppl": dense_ppl, "training": training, **more, "command": command}


def batch_header(*, checkpoints: dict, ratios: list, policy_dir: Optional[str],
                 fingerprint: Optional[str], seed: int, mode: str, training: Optional[dict],
                 num_shards: int, shard_index: int, command: str, **more) -> dict:
    """The run-level fields of a batch shard (launch.batch_prune); `more`: e.g. guard."""
    return {"checkpoints": checkpoints, "ratios": ratios, "policy_dir": policy_dir,
            "policy_fingerprint": fingerprint, "seed": seed, "mode": mode, "training": training,
            "num_shards": num_shards, "shard_index": shard_index, **more, "command": command}


def batch_summary(entries: list[OutputEntry], manifest_path: str) -> tuple[dict, list[str]]:
    """The batch launcher's last JSON line, and the names of the checkpoints that failed."""
    failed = sorted({e.checkpoint for e in entries if not e.done})
    return ({"outputs": [e.to_json() for e in entries], "failed": failed,
             "manifest": manifest_path}, failed)


# ----------------------------------------------------------------------------- recovery

RECOVER_STATE = "recover_state"  # <out_dir>/recover_state/ratio_<r>/<step>/: recovery training state
RECOVERY = "recovery"  # an output entry's recovery fine-tune, under this key


def recovery_fields(*, steps: int, objective: str, method: str, tokens_seen: int, ppl_before,
                    ppl_after, config: dict, seconds: dict, losses: list,
                    resumed_after: Optional[int], eval_setting: Optional[dict] = None) -> dict:
    """What an output entry records of its recovery fine-tune (OutputEntry.extra[RECOVERY]);
    `eval_setting`: what the ppl values were measured on."""
    return {RECOVERY: {"steps": steps, "objective": objective, "method": method,
                       "tokens_seen": tokens_seen, "ppl_before": ppl_before,
                       "ppl_after": ppl_after, "eval": eval_setting, "config": config,
                       "seconds": seconds, "losses": losses, "resumed_after": resumed_after}}


def recover_header(*, inputs: list, dense: str, config: dict, command: str) -> dict:
    """The run-level fields of a launch.recover run folder."""
    return {"recovered_from": inputs, "dense": dense, "recovery": config, "command": command}

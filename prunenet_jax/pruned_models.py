"""What names a pruned model -> the pruned model(s) it names: the one resolver of every launcher
(`--model` of launch.generate, `--input` of launch.convert and launch.recover, `--pruned` of
launch.evaluate). Four ways to name one:

  (a) a run folder (`--out_dir` of launch.prune, launch.batch_prune or launch.recover: a
      manifest.json): its finished outputs, `[<name>/][<mode>/]ratio_<r>/{orbax,hf}`;
  (b) a folder holding outputs: `[<mode>/]ratio_<r>` (orbax/ and maybe hf/), a batch item's
      `<name>/`, or a mode's folder, inside a run folder or copied out of one;
  (c) an orbax sliced-model folder;
  (d) a Hugging Face folder.

`--ratio`/`--mode` pick among several. The run folder is read through formats/run_dir.py, orbax
metadata through formats/orbax.py; anything that is not a folder (`default`, a .gguf file, a hub
id, a missing path) is left to sources.py.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from prunenet_jax.errors import UserError
from prunenet_jax.formats import run_dir

_UP = 4  # a run folder lies at most this far above an output's format folder:
#          <run>/<name>/<mode>/ratio_<r>/<orbax|hf>
_LISTED = 12  # outputs named in a message before "... and N more"


@dataclasses.dataclass(frozen=True)
class PrunedModel:
    """One pruned model: its folders, how it was made, and the label tables and plots show."""
    label: str  # source + mode + ratio (e.g. "default energy 0.2"); a folder name when unknown
    where: str  # its folder relative to the path the user gave ("sample/ratio_0.1"; "." for itself)
    orbax_dir: Optional[str]
    hf_dir: Optional[str]
    ratio: Optional[float]  # the nominal ratio recorded (manifest or orbax metadata)
    mode: Optional[str] = None  # how its channels were selected (no " +guard")
    guard: bool = False
    source: Optional[str] = None  # the dense model it was pruned from, as recorded
    recovery: Optional[dict] = None  # its recovery fine-tune's record, if it had one
    checkpoint: Optional[str] = None  # a batch item's name

    @property
    def mode_label(self) -> Optional[str]:
        return f"{self.mode} +guard" if self.mode and self.guard else self.mode

    def folder(self, prefer: str = run_dir.HF) -> str:
        """The folder to load: the `prefer`red format's when there is one, else the other."""
        first, second = ((self.hf_dir, self.orbax_dir) if prefer == run_dir.HF
                         else (self.orbax_dir, self.hf_dir))
        return first or second


def resolve(path: str, ratio: Optional[float] = None, mode: Optional[str] = None,
            flag: str = "--model") -> Optional[list[PrunedModel]]:
    """The pruned models `path` names (every one of a run folder's finished outputs, narrowed by
    `ratio`/`mode`); None when `path` is not a folder, for sources.py to resolve (`default`, a
    .gguf file, a hub id, or the error of a missing path)."""
    if not os.path.isdir(path):
        if ratio is not None or mode is not None:
            what = "is not a folder" if os.path.exists(path) or path == "default" else "no such folder"
            raise UserError(f"{flag}={path}: {what}; --ratio/--mode pick among the pruned models of "
                            "a folder (a prune run's --out_dir, or one of its [<mode>/]ratio_<r>)")
        return None
    found = _in_run(path) or _local(path)
    if found is None:
        if ratio is not None or mode is not None:
            raise UserError(f"--ratio/--mode pick among the pruned models of a prune run folder; "
                            f"{flag}={path} holds none; drop them")
        return None
    return _pick(found, path, ratio, mode, flag)


def resolve_one(path: str, ratio: Optional[float] = None, mode: Optional[str] = None,
                flag: str = "--model") -> Optional[PrunedModel]:
    """The one pruned model `path` names (see `resolve`); a UserError listing them when it names
    several and `ratio`/`mode` pick none; None for sources.py's kinds."""
    found = resolve(path, ratio, mode, flag)
    if found is None:
        return None
    if len(found) > 1:
        example = os.path.join(path, found[0].where, run_dir.ORBAX)
        asked = _asked(ratio, mode)
        raise UserError(f"{flag}={path} holds {len(found)} pruned models{asked and ' of ' + asked}: "
                        f"{_listing(found)}; pick one with --ratio=R [--mode=M], or pass one's "
                        f"folder, e.g. {example}")
    return found[0]


def unique_labels(models: list[PrunedModel], taken: tuple = ("dense",)) -> list[PrunedModel]:
    """`models` with labels told apart: a repeated one gets "#2", "#3", ... (as does one equal
    to a name in `taken`)."""
    names, out = set(taken), []
    for m in models:
        label, n = m.label, 2
        while label in names:
            label, n = f"{m.label}#{n}", n + 1
        names.add(label)
        out.append(dataclasses.replace(m, label=label))
    return out


def weights_ratio(recorded, kept: int, width: int, where: str) -> float:
    """The ratio a pruned model is labelled with, from its weights: `recorded` (a manifest's or
    orbax metadata's nominal ratio) when it keeps exactly `kept` of the dense model's `width`
    channels (int((1 - r) * width), the pruning's rounding), 1 - kept/width when nothing is
    recorded; a UserError naming `where` when the record disagrees with the weights."""
    from prunenet_jax.method.sampling import num_kept  # imported on use: it imports jax

    measured = 1.0 - kept / width
    if recorded is None:
        return measured
    ok = isinstance(recorded, (int, float)) and not isinstance(recorded, bool)
    if ok:
        try:
            ok = num_kept(width, recorded) == kept
        except UserError:
            ok = False
    if not ok:
        raise UserError(f"{where} records ratio {recorded!r}, but its weights keep {kept} of the "
                        f"dense model's {width} channels per layer (ratio "
                        f"{run_dir.format_ratio(measured)}); the record was edited or belongs to "
                        "another model: restore it, or pass the model's own folder")
    return float(recorded)


# ----------------------------------------------------------------------------- the four ways

def _in_run(path: str) -> Optional[list[PrunedModel]]:
    """(a) and (b) inside a run folder: the finished outputs at or below `path` of the nearest run
    folder at or above it (the run folder itself: its every finished output, or its error)."""
    real = os.path.realpath(path)
    folder = path
    model_here = _is_hf(path) or _is_orbax(path)  # a manifest.json beside it is not a run's
    for up in range(_UP + 1):
        if run_dir.is_run_dir(folder):
            strict = up == 0 and not model_here  # the run folder named: its errors are the user's
            found = [m for m in (_match(o, folder, path, real)
                                 for o in run_dir.finished_outputs(folder, strict=strict)) if m]
            if found:
                return found
        parent = os.path.normpath(os.path.join(folder, os.pardir))
        if os.path.realpath(parent) == os.path.realpath(folder):
            break
        folder = parent
    return None


def _match(o: run_dir.FinishedOutput, run: str, path: str, real: str) -> Optional[PrunedModel]:
    """The output `o` of the run folder `run` when it lies at or below `path`: only the named
    format's folder when `path` is its orbax or HF folder."""
    orbax_dir, hf_dir = o.orbax_dir, o.hf_dir
    if orbax_dir and _is_orbax(orbax_dir):  # (a hand-made run may hold an HF folder there)
        _check_record(o, run)
    if orbax_dir and os.path.realpath(orbax_dir) == real:
        orbax_dir, hf_dir = path, None
    elif hf_dir and os.path.realpath(hf_dir) == real:
        orbax_dir, hf_dir = None, path
    elif os.path.realpath(run) != real:  # a folder between the run folder and the output
        home = os.path.realpath(os.path.dirname(os.path.normpath(o.model_dir)))
        if not (home == real or home.startswith(real.rstrip(os.sep) + os.sep)):
            return None
        inside = lambda d: d and os.path.normpath(
            os.path.join(path, os.path.relpath(os.path.realpath(d), real)))
        orbax_dir, hf_dir = inside(orbax_dir), inside(hf_dir)
    home = os.path.dirname(os.path.normpath(o.model_dir))
    where = os.path.relpath(os.path.realpath(home), real)
    where = "." if where.startswith(os.pardir) else where
    fallback = os.path.join(os.path.basename(os.path.abspath(run)),
                            os.path.relpath(home, run))
    return PrunedModel(_label(o.checkpoint or o.source, o.mode, o.ratio, o.recovery, fallback),
                       where, orbax_dir, hf_dir, o.ratio, o.mode_name, o.guard, o.source,
                       o.recovery, o.checkpoint)


def _check_record(o: run_dir.FinishedOutput, run: str) -> None:
    """The manifest's record of output `o` agrees with the orbax metadata of the model it names
    (kind, mode, guard, ratio): an edited manifest must not label one model as another."""
    where = os.path.join(run, run_dir.MANIFEST)
    meta = _orbax_meta(o.orbax_dir)
    if meta is None:
        raise UserError(f"{where}: the output at ratio {o.ratio} names {o.orbax_dir}, which is not "
                        "a pruned model's orbax checkpoint; restore the manifest, or pass the "
                        "model's own folder")
    recorded = {"mode": o.mode_name, "guard": o.guard, "ratio": o.ratio}
    saved = {"mode": meta.get("mode"), "guard": bool(meta.get("guard")), "ratio": meta.get("ratio")}
    for key, value in recorded.items():
        if value is None or saved[key] is None:
            continue  # not recorded on one side (an older run, a converted model)
        same = (abs(float(value) - float(saved[key])) < 1e-12 if key == "ratio"
                and isinstance(saved[key], (int, float)) else value == saved[key])
        if not same:
            raise UserError(f"{where} records {key} {value!r} for {o.orbax_dir}, but the model's "
                            f"own metadata says {saved[key]!r}; restore the manifest, or pass the "
                            "model's own folder")


def _local(path: str) -> Optional[list[PrunedModel]]:
    """(b), (c) and (d) outside a run folder: an orbax sliced model, an HF folder, a ratio
    folder holding them, or a folder of ratio folders; None for anything else."""
    own = _model_folder(path, ".")
    if own is not None:
        return [own]
    found: list[PrunedModel] = []

    def walk(folder: str, depth: int) -> None:  # [<name>/][<mode>/]ratio_<r>, in name order
        if depth > _UP - 1 or _is_orbax(folder) or _is_hf(folder):
            return
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except OSError:
            return
        for name in names:
            sub = os.path.join(folder, name)
            if not os.path.isdir(sub):
                continue
            model = _model_folder(sub, os.path.relpath(sub, path)) if name.startswith("ratio_") else None
            if model is not None:
                found.append(model)
            else:
                walk(sub, depth + 1)

    walk(path, 1)
    return found or None


def _model_folder(path: str, where: str) -> Optional[PrunedModel]:
    """(c) `path` is an orbax sliced model, (d) an HF folder (with its sibling orbax folder's
    record), or (b) a ratio folder holding orbax/ and/or hf/; None when it is none of these."""
    if _is_orbax(path):
        meta = _orbax_meta(path)
        return None if meta is None else _from_meta(meta, path, None, path, where)
    if _is_hf(path):  # our export (<ratio folder>/hf) is described by its sibling orbax folder
        sibling = os.path.join(os.path.dirname(os.path.normpath(path)), run_dir.ORBAX)
        ours = os.path.basename(os.path.normpath(path)) == run_dir.HF and _is_orbax(sibling)
        meta = _orbax_meta(sibling) if ours else None
        return _from_meta(meta or {}, None, path, path, where)
    orbax_dir, hf_dir = os.path.join(path, run_dir.ORBAX), os.path.join(path, run_dir.HF)
    meta = _orbax_meta(orbax_dir) if _is_orbax(orbax_dir) else None
    has_hf = _is_hf(hf_dir)
    if meta is None and not has_hf:
        return None
    return _from_meta(meta or {}, orbax_dir if meta is not None else None,
                      hf_dir if has_hf else None, path, where)


def _from_meta(meta: dict, orbax_dir: Optional[str], hf_dir: Optional[str], path: str,
               where: str) -> PrunedModel:
    ratio = meta.get("ratio")
    if ratio is None:  # an HF export alone: its folder's name is the nominal ratio
        ratio = _ratio_of_name(os.path.basename(os.path.normpath(path)))
        if ratio is None and os.path.basename(os.path.normpath(path)) in (run_dir.ORBAX, run_dir.HF):
            ratio = _ratio_of_name(os.path.basename(os.path.dirname(os.path.normpath(path))))
    ratio = None if ratio is None else float(ratio)
    mode, guard = meta.get("mode"), bool(meta.get("guard"))
    recovery = ({"steps": meta.get("recovery_steps"), "method": meta.get("recovery_method"),
                 "objective": meta.get("recovery_objective")}
                if meta.get("recovered_from") else None)
    source = meta.get("source") if meta.get("ratio") is not None else None  # a pruned model's
    mode_label = f"{mode} +guard" if mode and guard else mode
    return PrunedModel(_label(source, mode_label, ratio, recovery, _short_name(path)), where,
                       orbax_dir, hf_dir, ratio, mode, guard, source, recovery)


def _ratio_of_name(name: str) -> Optional[float]:
    if not name.startswith("ratio_"):
        return None
    try:
        return float(name[len("ratio_"):])
    except ValueError:
        return None


def _is_orbax(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _orbax_meta(path: str) -> Optional[dict]:
    """A sliced model's metadata; None for another kind of orbax checkpoint (a policy, scores)."""
    from prunenet_jax.formats import orbax  # imported on use: orbax is slow to import

    meta = orbax.read_meta(path)
    return meta if meta is not None and meta.get("kind") == orbax.MODEL_KIND else None


# ----------------------------------------------------------------------------- labels, picking

def _label(source: Optional[str], mode: Optional[str], ratio: Optional[float],
           recovery: Optional[dict], fallback: str) -> str:
    """"<source> <mode> <ratio>[ recovered]" (e.g. "default energy 0.2"); `fallback` (a folder
    name) when the source or ratio is not recorded."""
    if not source or ratio is None:
        return fallback
    name = os.path.basename(os.path.normpath(source)) if os.path.exists(source) else source
    return " ".join(p for p in (name, mode, run_dir.format_ratio(ratio),
                                "recovered" if recovery else None) if p)


def _short_name(path: str) -> str:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    # A prune run's outputs are <run>/ratio_<r>/{hf,orbax}: the folder name alone says little.
    return "/".join(parts[-2:]) if parts[-1] in (run_dir.HF, run_dir.ORBAX) and len(parts) > 1 else parts[-1]


def _listing(models: list[PrunedModel]) -> str:
    names = [m.label if m.where == "." else m.where for m in models]
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def _pick(found: list[PrunedModel], path: str, ratio: Optional[float], mode: Optional[str],
          flag: str) -> list[PrunedModel]:
    chosen = found
    if ratio is not None:
        chosen = [m for m in chosen if m.ratio is not None and abs(m.ratio - ratio) < 1e-9]
    if mode is not None:
        chosen = [m for m in chosen if m.mode == mode]
    if not chosen:
        raise UserError(f"{flag}={path} holds no pruned model of {_asked(ratio, mode)}; it holds "
                        f"{len(found)}: {_listing(found)}")
    return chosen


def _asked(ratio: Optional[float], mode: Optional[str]) -> str:
    return " and ".join(filter(None, [ratio is not None and f"--ratio={ratio:g}",
                                      mode is not None and f"--mode={mode}"]))

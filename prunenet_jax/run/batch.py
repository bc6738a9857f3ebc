"""Many checkpoints x many ratios with one policy (launch.batch_prune).

Each checkpoint is loaded once, its channel scores measured when a mode needs them (energy: its own
calibration tokens and scores in `<out_dir>/<name>/`), pruned at every ratio and mode, written to
`<out_dir>/<name>/[<mode>/]ratio_<r>/`,
and released before the next; the (shard's) manifest records every output after each one, so
rerunning the same job skips what is done. A checkpoint that fails (missing, corrupt, other
shapes than the policy's) is recorded as failed and the batch goes on. Shards split the list
(every n-th checkpoint) and merge their manifests (run_dir.merge_manifests).
"""
from __future__ import annotations

import dataclasses
import gc
import glob
import hashlib
import os
from typing import Optional

from absl import logging

from prunenet_jax import progress, prune, sources
from prunenet_jax.errors import UserError, WriteError
from prunenet_jax import perplexity
from prunenet_jax.formats import orbax
from prunenet_jax.method import calibration as calibration_lib
from prunenet_jax.method import scores as scores_lib
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import trainer
from prunenet_jax.models import registry
from prunenet_jax.files import output_folder, run_lock
from prunenet_jax.formats import run_dir
from prunenet_jax.run.prune_run import (Measure, OutputOptions, Selection, Training,
                                        calibration_tokens, check_ratios_fit, prune_at_ratios)
from prunenet_jax.formats.run_dir import Manifest, OutputEntry

_MAX_LIST_BYTES = 16 * 2**20  # a checkpoint list is a text file, not a model


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """Everything launch.batch_prune asks for."""
    checkpoints: tuple  # what each item names (anything --model accepts; hub ids may end @rev)
    ratios: tuple
    training: Training
    outputs: OutputOptions
    out_dir: str
    policy: Optional[str] = None
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    eval: Optional[perplexity.EvalConfig] = None
    calibration: calibration_lib.Calibration = calibration_lib.Calibration()
    command: str = ""

    def check(self) -> None:
        """Refuses what cannot work, before anything is loaded or created."""
        if not self.checkpoints:
            raise UserError("--checkpoints is required: a comma list, a text file or a glob")
        self.training.check()
        self.outputs.check(self.out_dir)
        if not self.out_dir:
            raise UserError("--out_dir is required (where the pruned checkpoints and manifest go)")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard_index={self.shard_index} must be in [0, --num_shards="
                            f"{self.num_shards})")
        if self.num_shards > 1 and not self.policy and self.outputs.needs_policy:
            raise UserError("several shards need one shared --policy: train it once with "
                            "launch.prune --out_dir=... and pass --policy=<that out_dir>/policy")
        # Rerunning into the same --out_dir resumes, so an existing folder is fine.
        output_folder.check_out_dir(self.out_dir, list(self.checkpoints) + ([self.policy] if self.policy else []))
        for name in output_names(list(self.checkpoints)):
            run_dir.check_inside(self.out_dir, os.path.join(self.out_dir, name))
        if not self.overwrite:  # a rerun continues: its manifest must be readable, before training
            run_dir.resumed_outputs(self.out_dir,
                                    run_dir.shard_manifest_name(self.shard_index, self.num_shards))
        if self.outputs.needs_scores:
            self.calibration.check(held_out="compensated" in self.outputs.modes)
        if self.eval is not None:
            self.eval.check()


def parse_checkpoints(spec: str) -> list[str]:
    """The checkpoint list: a text file (one per line, # comments), or a comma list whose items
    may be globs (expanded in sorted order)."""
    if os.path.isfile(spec) and not spec.endswith(".gguf") and not glob.has_magic(spec):
        items = [line.strip() for line in _read_list(spec).splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if part and glob.has_magic(part):
                found = sorted(glob.glob(part))
                if not found:
                    raise UserError(f"--checkpoints: {part!r} matches nothing; check the pattern")
                items += found
            elif part:
                items.append(part)
    if not items:
        raise UserError(f"--checkpoints={spec!r} names no checkpoint; pass a comma list, a text "
                        "file with one per line, or a glob")
    return items


def _read_list(path: str) -> str:
    """The text of a checkpoint list file; a binary or unreadable file is a UserError."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_LIST_BYTES + 1)
    except OSError as e:
        raise UserError(f"--checkpoints={path}: cannot read it ({e.strerror}); check the path "
                        "and permissions") from None
    try:
        if len(data) > _MAX_LIST_BYTES or b"\0" in data:
            raise ValueError
        return data.decode("utf-8")
    except ValueError:
        raise UserError(f"--checkpoints={path} is not a text file (one checkpoint per line); pass "
                        "a list file, a comma list or a glob") from None


def split_revision(source: str) -> tuple[str, Optional[str]]:
    """`org/name@revision` -> (org/name, revision) for hub ids; local paths are left whole."""
    if "@" in source and not os.path.exists(source):
        name, _, revision = source.rpartition("@")
        return name, revision or None
    return source, None


def output_names(checkpoints: list[str]) -> list[str]:
    """A folder name for each checkpoint, unique and the same for a given list on every shard:
    the base name of the resolved source (`org--name` for a hub id; a `.gguf` file without the
    suffix unless another item has that name); when items still share a name, or it is one of
    the run folder's own names, `<name>-<8 hex digits of a sha256 of the resolved source>`. A
    source listed twice is refused."""
    keys, bases = [], []
    for item in checkpoints:
        src, _ = split_revision(item)
        if os.path.exists(src) or not sources.is_hub_id(src):
            key = os.path.realpath(src)  # `x/..`, links and relative paths name what they reach
            base = os.path.basename(key)
        else:
            key, base = f"hub:{item}", src.replace("/", "--")
        if key in keys:
            raise UserError(f"--checkpoints lists {item!r} twice (as "
                            f"{checkpoints[keys.index(key)]!r}); list each checkpoint once")
        keys.append(key)
        bases.append(base)
    names = []
    for i, base in enumerate(bases):
        stem = base[:-5] if base.endswith(".gguf") else base
        names.append(stem if stem not in bases[:i] + bases[i + 1:] else base)
    shared = {n for n in names if names.count(n) > 1}
    for i, (key, name) in enumerate(zip(keys, names)):
        if name in shared or name in run_dir.RESERVED or name.startswith(".") or not name:
            stem = bases[i][:-5] if bases[i].endswith(".gguf") else bases[i]
            names[i] = f"{stem or 'checkpoint'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    for i, name in enumerate(names):  # a hashed name equal to another item's plain one
        if names.index(name) != i:
            raise UserError(f"--checkpoints: {checkpoints[names.index(name)]!r} and "
                            f"{checkpoints[i]!r} would share the output folder {name!r}; rename "
                            "one of them")
    return names


def get_policy(job: BatchJob, mesh) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
    """(params, training summary, policy dir): the job's policy, or one trained on the first
    checkpoint (resumable, in <out_dir>/policy); Nones when no mode needs a policy."""
    if not job.outputs.needs_policy:
        return None, None, None
    if job.policy:
        params, _ = orbax.load_policy(job.policy)
        return params, {"policy": os.path.abspath(job.policy)}, os.path.abspath(job.policy)
    cfg = job.training.config
    path, revision = split_revision(job.checkpoints[0])
    weights = sources.load_model(path, revision=revision)  # a failure here stops the batch
    check_ratios_fit(weights.config.intermediate_size, list(job.ratios) + [cfg.ratio],
                     job.checkpoints[0])
    params, summary = trainer.train_policy(
        weights.layers[registry.scored(weights.config)], weights.config, cfg, seed=job.outputs.seed,
        episodes=job.training.episodes, mesh=mesh(),
        state_dir=os.path.join(job.out_dir, run_dir.TRAIN_STATE),
        policy_dir=os.path.join(job.out_dir, run_dir.POLICY), resume=True,
        source=job.checkpoints[0], checkpoint_every=job.training.checkpoint_every)
    return params, summary, run_dir.POLICY


def _prune_one(job: BatchJob, name: str, source: str, params: Optional[dict], policy_meta,
               manifest: Manifest, bar) -> None:
    """Load, measure scores (energy), prune at every ratio and mode, write, release; a failure
    marks this checkpoint's remaining outputs failed and returns."""
    outputs = job.outputs
    # Without scores yet, an energy output's recipe is unknown: such a checkpoint is loaded, and
    # its saved scores make the check below skip the outputs already done.
    if (not job.overwrite and not outputs.needs_scores
            and all(manifest.is_done(r, outputs.recipe(m, params), name)
                    for r in job.ratios for m in outputs.modes)):
        bar.update(len(job.ratios) * len(outputs.modes))  # finished by an earlier run
        return
    weights = None
    path, revision = split_revision(source)
    try:
        config = sources.load_config(path, revision)  # shape errors before the weights are read
        if policy_meta is not None:
            orbax.check_policy_fits(policy_meta, config, source, job.policy)
        check_ratios_fit(config.intermediate_size, job.ratios, source)
        if job.eval is not None:
            job.eval.check_model(config, source)
        if job.outputs.recover is not None:
            job.outputs.recover.check(config, job.ratios)
        outputs.check_exportable(config, path, revision)
        weights = sources.load_model(path, revision=revision)
        scores, folder = None, os.path.join(job.out_dir, name)
        if outputs.needs_scores:
            scores, _ = scores_lib.obtain(weights, job.calibration,
                                          lambda: sources.load_tokenizer(weights), folder=folder)
        measure = Measure(weights, job.eval)
        dense = measure.dense or {}
        selection = Selection(weights, params, outputs, scores,
                              calibration_tokens(weights, scores, job.calibration, folder))
        prune_at_ratios(weights, selection, job.ratios, outputs,
                        out_dir=os.path.join(job.out_dir, name), manifest=manifest, measure=measure,
                        card={"source": source, "command": job.command}, checkpoint=name,
                        extra={"source": source, "dense_ppl": dense.get("ppl"),
                               **({"dense_accuracy": dense["accuracy"]} if dense else {})},
                        on_output=lambda e: bar.update(1))
    except WriteError:
        raise  # a full disk or lost permission is not this checkpoint's fault: stop the batch
    except Exception as e:  # one bad checkpoint must not stop the batch
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, UserError):
            logging.exception("unexpected error on %s", source)
        progress.message(f"error: {name}: {message}")  # above the progress bar
        for r, mode in ((r, m) for r in job.ratios for m in outputs.modes):
            done = manifest.find(r, name, mode)
            if done is None or not done.done:
                manifest.record(OutputEntry(ratio=r, status=run_dir.FAILED, checkpoint=name,
                                            error=message, recipe=outputs.recipe(mode, params),
                                            extra={"source": source}))
                bar.update(1)
    finally:
        del weights
        gc.collect()


@dataclasses.dataclass
class BatchResult:
    outputs: list  # OutputEntry per (checkpoint, ratio) of this shard
    manifest_path: str
    num_checkpoints: int  # of this shard

    def summary(self) -> tuple[dict, list]:
        return run_dir.batch_summary(self.outputs, self.manifest_path)

    def failure(self) -> Optional[str]:
        """What failed (the launcher's `error:` line, exit code 1), or None."""
        _, failed = self.summary()
        if not failed:
            return None
        return (f"{len(failed)} of {self.num_checkpoints} checkpoints failed: {', '.join(failed)} "
                f"(details in {self.manifest_path})")

    def format_table(self) -> str:
        """One row per output of this shard: (checkpoint, ratio, mode), with its status."""
        width = max([len("checkpoint")] + [len(e.checkpoint) for e in self.outputs])
        fmt = lambda v, f: "-" if v is None else format(v, f)
        lines = [f"{'checkpoint':<{width}}  {'ratio':>6}  {'mode':<14}  {'kept':>6}  "
                 f"{'params':>13}  {'ppl':>10}  {'retained':>8}  status"]
        for e in self.outputs:
            mode = (e.recipe.get("mode") or "") + (" +guard" if e.recipe.get("guard") else "")
            kept = e.extra.get("accuracy_retention")
            retained = "-" if kept is None else f"{100 * kept:.1f}%"
            lines.append(f"{e.checkpoint:<{width}}  {run_dir.format_ratio(e.ratio):>6}  {mode:<14}  "
                         f"{fmt(e.kept, ''):>6}  {fmt(e.params, ','):>13}  {fmt(e.ppl, '.3f'):>10}  "
                         f"{retained:>8}  {e.status}")
        return "\n".join(lines)


def merge(out_dir: Optional[str], num_shards: Optional[int]) -> dict:
    """--merge: manifest.json from the shard manifests in `out_dir` (run_dir.merge_manifests)."""
    if not out_dir or num_shards is None:
        raise UserError("--merge needs --out_dir and --num_shards")
    return run_dir.merge_manifests(out_dir, num_shards)


def run(job: BatchJob, mesh) -> BatchResult:
    """The whole batch (this shard's share). `job` is checked (BatchJob.check) before anything
    is created, then the shard's lock taken (shards write disjoint items and manifests: each
    locks only its own share). `mesh()` gives the training mesh (called only when a policy is
    trained)."""
    job.check()
    prune.warn_if_sample_alone(job.outputs.modes)
    with run_lock.hold(job.out_dir, name=run_dir.lock_name(job.shard_index, job.num_shards)):
        return _run(job, mesh)


def _run(job: BatchJob, mesh) -> BatchResult:
    uses_policy = job.policy and job.outputs.needs_policy
    policy_meta = orbax.load_policy(job.policy)[1] if uses_policy else None
    params, training, policy_dir = get_policy(job, mesh)
    names = output_names(list(job.checkpoints))
    mine = list(zip(names, job.checkpoints))[job.shard_index::job.num_shards]
    modes = job.outputs.modes
    header = run_dir.batch_header(
        checkpoints=dict(zip(names, job.checkpoints)), ratios=list(job.ratios),
        policy_dir=policy_dir, fingerprint=params and policy_lib.fingerprint(params),
        seed=job.outputs.seed, mode=",".join(modes), training=training,
        num_shards=job.num_shards, shard_index=job.shard_index, command=job.command,
        guard=job.outputs.guard)
    manifest = Manifest(job.out_dir, header, resume=not job.overwrite,
                        name=run_dir.shard_manifest_name(job.shard_index, job.num_shards),
                        by_mode=len(modes) > 1)
    manifest.save()
    bar = progress.bar(total=len(mine) * len(job.ratios) * len(modes), desc="outputs")
    for name, source in mine:
        bar.set_postfix(checkpoint=name)
        _prune_one(job, name, source, params, policy_meta, manifest, bar)
    bar.close()
    if job.num_shards > 1:
        run_dir.merge_manifests(job.out_dir, job.num_shards)
    entries = [manifest.find(r, n, m) for n, _ in mine for r in job.ratios for m in modes]
    return BatchResult(entries, manifest.path, len(mine))

"""launch.recover's whole job (`RecoverJob`, `run`): pruned outputs in (whatever names them:
pruned_models.resolve), each recovered (recover.py) and written atomically: orbax, an HF
folder with --export_hf, a GGUF file with --export_gguf, and its manifest entry; `format_table` is what the launcher prints."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

from prunenet_jax import perplexity, pruned_models, sources
from prunenet_jax.errors import UserError
from prunenet_jax.files import output_folder, run_lock
from prunenet_jax.formats import gguf_export, orbax, run_dir
from prunenet_jax.recovery import lineage, placement
from prunenet_jax.recovery.recover import RecoverSpec, recover_weights


@dataclasses.dataclass(frozen=True)
class RecoverJob:
    """Everything launch.recover asks for."""
    input: str  # a prune run folder (each finished output), [<mode>/]ratio_<r>, orbax or HF folder
    out_dir: str
    recovery: RecoverSpec  # the fine-tune, its text, checkpoints, --resume
    dense: Optional[str] = None  # default: the source recorded with the pruned model
    export_hf: bool = False
    export_gguf: bool = False
    gguf_type: str = "f16"  # formats/gguf_export.GGUF_TYPES
    overwrite: bool = False
    eval: Optional[perplexity.EvalConfig] = None
    data_devices: int = 0  # 0: all
    shard_params: str = "auto"  # placement.should_shard
    command: str = ""
    ratio: Optional[float] = None  # --ratio/--mode: which pruned models of a run folder
    mode: Optional[str] = None

    def check(self) -> None:
        """Refuses what cannot work, before anything is loaded or created."""
        run_dir.check_resume(self.out_dir, self.recovery.resume, self.overwrite)
        self.recovery.check()
        gguf_export.check_type(self.gguf_type)
        placement.check_data_devices(self.data_devices)


def pruned_inputs(path: str, ratio: Optional[float] = None,
                  mode: Optional[str] = None) -> list[pruned_models.PrunedModel]:
    """The pruned models `path` names (pruned_models.resolve), narrowed by `ratio`/`mode`."""
    found = pruned_models.resolve(path, ratio, mode, "--input")
    if found is None:
        raise UserError(f"--input={path} is neither a prune run folder nor a pruned model's folder; "
                        "pass <out_dir>, <out_dir>/[<mode>/]ratio_<r> or .../orbax of launch.prune")
    return found


def _dense_source(job: RecoverJob, p: pruned_models.PrunedModel) -> str:
    if job.dense:
        return job.dense
    meta = (orbax.read_meta(p.orbax_dir) if p.orbax_dir else None) or {}
    packaged = meta.get("source") in sources.PACKAGED_MODELS
    source = meta.get("gguf_file") if packaged else meta.get("source")
    source = source or p.source
    if not source:
        raise UserError(f"{p.folder(run_dir.ORBAX)} records no source model; pass it with --dense")
    return source


def _ratio_record(path: str, p: pruned_models.PrunedModel) -> str:
    """Where `p`'s recorded ratio was read, for the error of a wrong one: the manifest of the run
    folder at or above `path` that lists it, else its orbax metadata, else `path` (a folder
    name)."""
    mine = {os.path.realpath(d) for d in (p.orbax_dir, p.hf_dir) if d}
    folder = os.path.abspath(path)
    while True:
        if run_dir.is_run_dir(folder) and any(
                mine & {os.path.realpath(d) for d in (o.orbax_dir, o.hf_dir) if d}
                for o in run_dir.finished_outputs(folder, strict=False)):
            return os.path.join(folder, run_dir.MANIFEST)
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    return f"the orbax metadata of {p.orbax_dir}" if p.orbax_dir else path


def _checked_ratios(job: RecoverJob, inputs: list, dense_name: str) -> list[float]:
    """Each input's ratio as its weights say (pruned_models.weights_ratio: a recorded one must
    match them), from the configs alone, after their other cheap checks: the LoRA rank, and the
    shapes against the dense model's."""
    dense_config = sources.load_config(dense_name)
    ratios = []
    for p in inputs:
        path = p.folder(run_dir.ORBAX)
        config = sources.load_config(path)  # the weights are checked against it when loaded
        if job.export_gguf:  # the tokenizer is the dense model's (what the outputs record)
            gguf_file, tokenizer_dir = sources.tokenizer_location(dense_name)
            gguf_export.check_exportable(config, gguf_file=gguf_file, tokenizer_dir=tokenizer_dir,
                                         source=path)
        job.recovery.config.check_model(config)
        lineage.check_parent_shapes(config, dense_config, path, dense_name)
        ratios.append(pruned_models.weights_ratio(p.ratio, config.intermediate_size,
                                                  dense_config.intermediate_size,
                                                  _ratio_record(job.input, p)))
    return ratios


def _check_out_dir(job: RecoverJob) -> None:
    output_folder.check_out_dir(job.out_dir, [job.input] + ([job.dense] if job.dense else []),
                                reuse=job.recovery.resume or job.overwrite)


def _remove_empty_folders(root: str) -> None:
    """Removes every folder under `root` (and `root`) that holds nothing, deepest first: state
    folders a failed run created and left empty."""
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only when empty


def run(job: RecoverJob) -> list:
    """Recovers every pruned model of `job.input` into `job.out_dir`; returns the manifest
    entries. Everything cheap (flags, inputs, configs, shapes, ratios) is checked before the
    out_dir is locked (files/run_lock.py, as launch.prune does) and checked again under the
    lock, since another run may have filled it meanwhile; a failed run leaves no empty state
    folder behind."""
    job.check()
    inputs = pruned_inputs(job.input, job.ratio, job.mode)
    _check_out_dir(job)
    dense_name = _dense_source(job, inputs[0])
    ratios = _checked_ratios(job, inputs, dense_name)
    with run_lock.hold(job.out_dir):
        _check_out_dir(job)
        try:
            return _recover_all(job, inputs, ratios, dense_name)
        except BaseException:
            _remove_empty_folders(os.path.join(job.out_dir, run_dir.RECOVER_STATE))
            raise


def _recover_all(job: RecoverJob, inputs: list, ratios: list[float], dense_name: str) -> list:
    """Loads the dense model, then recovers and writes each input at its checked ratio."""
    spec = job.recovery
    mesh = placement.data_mesh(job.data_devices or None)
    dense = sources.load_model(dense_name)
    needs_tokenizer = bool(spec.train_text) or job.eval is not None
    tokenizer = sources.load_tokenizer(dense) if needs_tokenizer else None
    measure = (lambda w: None) if job.eval is None else (
        lambda w, f=perplexity.perplexity_fn(tokenizer, job.eval): f(w)["ppl"])
    header = run_dir.recover_header(inputs=[os.path.abspath(p.folder(run_dir.ORBAX)) for p in inputs],
                                    dense=dense_name, config=dataclasses.asdict(spec.config),
                                    command=job.command)
    # a run with several modes has <mode>/ratio_<r>/ outputs: keep them apart here too
    by_mode = len({p.mode for p in inputs}) > 1
    manifest = run_dir.Manifest(job.out_dir, header, resume=spec.resume, by_mode=by_mode)
    entries = []
    for p, ratio in zip(inputs, ratios):
        path, folder_mode = p.folder(run_dir.ORBAX), (p.mode if by_mode else None)
        pruned = sources.load_model(path)
        lineage.check_parent(pruned, dense, path, dense_name)
        # a batch run's items keep their own folders (<name>/[<mode>/]ratio_<r>)
        item = [p.checkpoint] if p.checkpoint else []
        orbax_dir, hf_dir, gguf_dir = run_dir.output_dirs(os.path.join(job.out_dir, *item), ratio,
                                                          folder_mode, job.out_dir)
        recovered, info = recover_weights(
            pruned, dense, spec, tokenizer=tokenizer, ppl=measure,
            state_dir=os.path.join(job.out_dir, run_dir.RECOVER_STATE, *item,
                                   *filter(None, [folder_mode]), run_dir.ratio_dirname(ratio)),
            mesh=mesh, shard_params=job.shard_params, eval_setting=job.eval and job.eval.setting())
        meta = {k: v for k, v in (orbax.read_meta(path) or {}).items()
                if k not in ("kind", "format_version", "hf_config", "dtypes", "tokenizer_dir",
                             "gguf_file", "has_kept")}
        for key, value in (("source", p.source), ("mode", p.mode),
                           ("guard", p.guard)):  # an HF input has no orbax record of its own
            meta.setdefault(key, value)
        meta["ratio"] = ratio  # as checked against the weights
        meta.update(recovered_from=os.path.abspath(path), recovery_steps=spec.config.steps,
                    recovery_objective=spec.config.objective, recovery_method=spec.config.method)
        save_like = dataclasses.replace(recovered, tokenizer_dir=dense.tokenizer_dir,
                                        gguf_file=dense.gguf_file)
        orbax.save_model(orbax_dir, save_like, meta, overwrite=True)
        entry = run_dir.OutputEntry(ratio=ratio, kept=recovered.config.intermediate_size,
                                    params=recovered.num_params(), ppl=info[run_dir.RECOVERY]["ppl_after"],
                                    orbax_dir=manifest.relative(orbax_dir), checkpoint=p.checkpoint,
                                    # the dense source the pruned model records, for its label
                                    extra={**info, **{k: meta[k] for k in ("source",) if meta.get(k)}},
                                    recipe={"mode": p.mode, **({"guard": True} if p.guard else {})})
        if job.export_hf:
            from prunenet_jax.formats import hf_export

            hf_export.export_hf(save_like, hf_dir, model_card=orbax.model_card_fields(meta),
                                overwrite=True)
            entry.hf_dir = manifest.relative(hf_dir)
        if job.export_gguf:
            gguf_export.export_gguf(save_like, gguf_dir, gguf_type=job.gguf_type,
                                    model_card=orbax.model_card_fields(meta), overwrite=True)
            entry.gguf_dir = manifest.relative(gguf_dir)
        manifest.record(entry)
        entries.append(entry)
    return entries


def format_table(entries: list) -> str:
    """The console table of recovered outputs: ratio, steps, tokens, ppl before, after the refit
    and after training."""
    fmt = lambda p: "-" if p is None else f"{p:.3f}"
    modes = [(e.recipe.get("mode") or "") + (" +guard" if e.recipe.get("guard") else "")
             for e in entries]
    width = max(len("mode"), *map(len, modes)) if any(modes) else 0  # no mode: no column
    mode = lambda m: f"{m:<{width}}  " if width else ""
    lines = [f"{'ratio':>6}  {mode('mode')}{'steps':>6}  {'tokens':>8}  {'ppl before':>10}  "
             f"{'after refit':>11}  {'ppl after':>10}"]
    for e, m in zip(entries, modes):
        r = e.extra[run_dir.RECOVERY]
        refit_ppl = (r.get("refit") or {}).get("ppl")
        lines.append(f"{run_dir.format_ratio(e.ratio):>6}  {mode(m)}{r['steps']:>6}  "
                     f"{r['tokens_seen']:>8}  {fmt(r['ppl_before']):>10}  {fmt(refit_ppl):>11}  "
                     f"{fmt(r['ppl_after']):>10}")
    return "\n".join(lines)

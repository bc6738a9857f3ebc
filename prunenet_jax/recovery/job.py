"""launch.recover's whole job (`RecoverJob`, `run`): pruned outputs in (an orbax folder, or a prune
run folder's finished outputs), each recovered (recover.py) and written atomically: orbax, an HF
folder with --export_hf, and its manifest entry; `format_table` is what the launcher prints."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from prunenet_jax import perplexity, sources
from prunenet_jax.errors import UserError
from prunenet_jax.files import output_folder
from prunenet_jax.formats import orbax, run_dir
from prunenet_jax.recovery import lineage, placement
from prunenet_jax.recovery.recover import RecoverSpec, recover_weights


@dataclasses.dataclass(frozen=True)
class RecoverJob:
    """Everything launch.recover asks for."""
    input: str  # a pruned model's orbax folder, or a prune run folder (each finished output)
    out_dir: str
    recovery: RecoverSpec  # the fine-tune, its text, checkpoints, --resume
    dense: Optional[str] = None  # default: the source recorded with the pruned model
    export_hf: bool = False
    overwrite: bool = False
    eval: Optional[perplexity.EvalConfig] = None
    data_devices: int = 0  # 0: all
    shard_params: str = "auto"  # placement.should_shard
    command: str = ""

    def check(self) -> None:
        """Refuses what cannot work, before anything is loaded or created."""
        run_dir.check_resume(self.out_dir, self.recovery.resume, self.overwrite)
        self.recovery.check()
        placement.check_data_devices(self.data_devices)


@dataclasses.dataclass(frozen=True)
class PrunedInput:
    """One pruned model to recover: its ratio, how its channels were chosen, its orbax folder."""
    ratio: Optional[float]
    path: str
    mode: Optional[str] = None
    guard: bool = False


def pruned_inputs(path: str) -> list[PrunedInput]:
    """The pruned models `path` names: a run folder's finished outputs, or one orbax folder."""
    if run_dir.is_run_dir(path):
        data_ = run_dir.read_manifest(os.path.join(path, run_dir.MANIFEST)) or {"outputs": []}
        found = [PrunedInput(e.get("ratio"), os.path.join(path, e["orbax_dir"]), e.get("mode"),
                             bool(e.get("guard")))
                 for e in data_["outputs"] if e.get("status") == run_dir.DONE and e.get("orbax_dir")]
        if not found:
            raise UserError(f"--input={path}: its manifest lists no finished orbax output; "
                            "finish the prune run first, or pass a ratio_<r>/orbax folder")
        return found
    meta = orbax.read_meta(path) if os.path.isdir(path) else None
    if meta is None or meta.get("kind") != orbax.MODEL_KIND:
        raise UserError(f"--input={path} is neither a prune run folder nor a pruned model's orbax "
                        "folder; pass <out_dir> or <out_dir>/ratio_<r>/orbax of launch.prune")
    return [PrunedInput(meta.get("ratio"), path, meta.get("mode"), bool(meta.get("guard")))]


def _dense_source(job: RecoverJob, orbax_dir: str) -> str:
    if job.dense:
        return job.dense
    meta = orbax.read_meta(orbax_dir)
    source = meta.get("gguf_file") if meta.get("source") == "default" else meta.get("source")
    if not source:
        raise UserError(f"{orbax_dir} records no source model; pass it with --dense")
    return source


def run(job: RecoverJob) -> list:
    """Recovers every pruned model of `job.input` into `job.out_dir`; returns the manifest entries."""
    job.check()
    spec = job.recovery
    inputs = pruned_inputs(job.input)
    output_folder.check_out_dir(job.out_dir, [job.input] + ([job.dense] if job.dense else []),
                                reuse=spec.resume or job.overwrite)
    configs = [(p.path, orbax.load_config(p.path)) for p in inputs]
    for _, config in configs:
        spec.config.check_model(config)
    dense_name = _dense_source(job, inputs[0].path)
    dense_config = sources.load_config(dense_name)
    for path, config in configs:  # shapes first (cheap); the tensors once loaded
        lineage.check_parent_shapes(config, dense_config, path, dense_name)
    mesh = placement.data_mesh(job.data_devices or None)
    dense = sources.load_model(dense_name)
    needs_tokenizer = bool(spec.train_text) or job.eval is not None
    tokenizer = sources.load_tokenizer(dense) if needs_tokenizer else None
    measure = (lambda w: None) if job.eval is None else (
        lambda w, f=perplexity.perplexity_fn(tokenizer, job.eval): f(w)["ppl"])
    header = run_dir.recover_header(inputs=[os.path.abspath(p.path) for p in inputs],
                                    dense=dense_name, config=dataclasses.asdict(spec.config),
                                    command=job.command)
    # a run with several modes has <mode>/ratio_<r>/ outputs: keep them apart here too
    by_mode = len({p.mode for p in inputs}) > 1
    manifest = run_dir.Manifest(job.out_dir, header, resume=spec.resume, by_mode=by_mode)
    entries = []
    for p in inputs:
        path, folder_mode = p.path, (p.mode if by_mode else None)
        pruned = sources.load_model(path)
        lineage.check_parent(pruned, dense, path, dense_name)
        ratio = float(p.ratio) if p.ratio is not None else 0.0
        orbax_dir, hf_dir = run_dir.output_dirs(job.out_dir, ratio, folder_mode)
        recovered, info = recover_weights(
            pruned, dense, spec, tokenizer=tokenizer, ppl=measure,
            state_dir=os.path.join(job.out_dir, run_dir.RECOVER_STATE, *filter(None, [folder_mode]),
                                   run_dir.ratio_dirname(ratio)),
            mesh=mesh, shard_params=job.shard_params, eval_setting=job.eval and job.eval.setting())
        meta = {k: v for k, v in (orbax.read_meta(path) or {}).items()
                if k not in ("kind", "format_version", "hf_config", "dtypes", "tokenizer_dir",
                             "gguf_file", "has_kept")}
        meta.update(recovered_from=os.path.abspath(path), recovery_steps=spec.config.steps,
                    recovery_objective=spec.config.objective, recovery_method=spec.config.method)
        save_like = dataclasses.replace(recovered, tokenizer_dir=dense.tokenizer_dir,
                                        gguf_file=dense.gguf_file)
        orbax.save_model(orbax_dir, save_like, meta, overwrite=True)
        entry = run_dir.OutputEntry(ratio=ratio, kept=recovered.config.intermediate_size,
                                    params=recovered.num_params(), ppl=info[run_dir.RECOVERY]["ppl_after"],
                                    orbax_dir=manifest.relative(orbax_dir), extra=info,
                                    recipe={"mode": p.mode, **({"guard": True} if p.guard else {})})
        if job.export_hf:
            from prunenet_jax.formats import hf_export

            hf_export.export_hf(save_like, hf_dir, model_card=orbax.model_card_fields(meta),
                                overwrite=True)
            entry.hf_dir = manifest.relative(hf_dir)
        manifest.record(entry)
        entries.append(entry)
    return entries


def format_table(entries: list) -> str:
    """The console table of recovered outputs: ratio, steps, tokens, ppl before, after the refit
    and after training."""
    fmt = lambda p: "-" if p is None else f"{p:.3f}"
    lines = [f"{'ratio':>6}  {'steps':>6}  {'tokens':>8}  {'ppl before':>10}  {'after refit':>11}  "
             f"{'ppl after':>10}"]
    for e in entries:
        r = e.extra[run_dir.RECOVERY]
        refit_ppl = (r.get("refit") or {}).get("ppl")
        lines.append(f"{e.ratio:>6}  {r['steps']:>6}  {r['tokens_seen']:>8}  "
                     f"{fmt(r['ppl_before']):>10}  {fmt(refit_ppl):>11}  {fmt(r['ppl_after']):>10}")
    return "\n".join(lines)

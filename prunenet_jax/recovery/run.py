"""Recovering pruned models: `recover_weights` fine-tunes one (used by launch.recover and by
launch.prune/batch_prune with --recover_steps); `RecoverJob`/`run` is launch.recover's whole job:
pruned outputs in (an orbax folder or a prune run folder), recovered outputs out (orbax, HF with
--export_hf, manifest entries), each written atomically.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from prunenet_jax import progress, sources
from prunenet_jax.errors import UserError
from prunenet_jax import perplexity
from prunenet_jax.formats import orbax
from prunenet_jax.generation import eos_ids
from prunenet_jax.models import decoder, registry
from prunenet_jax.recovery import data, lora, refit, trainer
from prunenet_jax.recovery.trainer import Recovery, RecoverConfig
from prunenet_jax.files import output_folder
from prunenet_jax.formats import run_dir
from prunenet_jax.weights import ModelWeights


def check_parent_shapes(a, b, pruned_name: str, dense_name: str) -> None:
    """Refuses a dense config that cannot be the pruned one's source: all but the FFN width agree."""
    fields = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "model_type")
    diff = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if not diff and a.intermediate_size > b.intermediate_size:
        diff = [f"intermediate_size {a.intermediate_size} > {b.intermediate_size}"]
    if diff:
        raise UserError(f"{pruned_name} cannot be a pruned version of {dense_name} ({', '.join(diff)}); "
                        "pass its source model with --dense")


def check_parent(pruned: ModelWeights, dense: ModelWeights, pruned_name: str, dense_name: str) -> None:
    """Refuses a dense model that is not the pruned model's source: the shapes, and the tensors
    pruning leaves untouched (embeddings, attention, norms), must agree."""
    check_parent_shapes(pruned.config, dense.config, pruned_name, dense_name)
    untouched = [registry.EMBED, registry.FINAL_NORM]
    for name in untouched + [registry.Q, registry.K, registry.V, registry.O, registry.INPUT_NORM]:
        x = pruned.globals.get(name, pruned.layers.get(name))
        y = dense.globals.get(name, dense.layers.get(name))
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if np.max(np.abs(x - y)) > 1e-2 * (np.max(np.abs(y)) + 1e-12):  # bf16 rounding passes
            raise UserError(f"{pruned_name} was not pruned from {dense_name}: their {name!r} "
                            "differ (pruning leaves it unchanged); pass its source model with --dense")


def to_weights(model: decoder.CausalLM, like: ModelWeights) -> ModelWeights:
    """`like` with every tensor replaced by the model's (host arrays, like's dtypes)."""
    arrays = decoder.named_arrays(model)
    cast = lambda name, old: np.asarray(arrays[name]).astype(old.dtype)
    return dataclasses.replace(
        like, globals={n: cast(n, a) for n, a in like.globals.items()},
        layers={n: cast(n, a) for n, a in like.layers.items()})


def _pool(cfg: RecoverConfig, teacher, dense: ModelWeights, tokenizer, train_text: Optional[str]):
    if train_text:  # lm always; distill on the user's text instead of sampled text
        return data.text_pool(tokenizer, train_text, cfg.seq_len)
    rows = cfg.generated_rows()
    bos = dense.hf_config.get("bos_token_id")
    bos = getattr(tokenizer, "bos_token_id", None) if bos is None else bos
    if bos is None:
        raise UserError(f"{dense.source} names no BOS token to start sampling from; use "
                        "--objective=lm with --train_text")
    return data.generated_pool(teacher, int(bos), eos_ids(dense), rows, cfg.seq_len, seed=cfg.seed)


def _pool_template(cfg: RecoverConfig, tokenizer, train_text: Optional[str]) -> Callable:
    """The shapes of a checkpointed pool (orbax restores into them)."""
    rows = cfg.generated_rows()
    if train_text:  # cheap to rebuild
        rows = len(data.text_pool(tokenizer, train_text, cfg.seq_len)[0])
    return lambda _: {k: np.zeros((rows, cfg.seq_len), np.int32) for k in ("tokens", "mask")}


def tokens_seen(cfg: RecoverConfig, mask: np.ndarray) -> int:
    """Target tokens (predicted positions) of every step of the run."""
    targets = (mask[:, 1:] * mask[:, :-1]).sum(axis=1)
    return int(sum(targets[data.step_rows(s, cfg.rows_per_step, len(mask), cfg.seed)].sum()
                   for s in range(cfg.steps)))


def recover_weights(pruned: ModelWeights, dense: ModelWeights, cfg: RecoverConfig, *, tokenizer,
                    train_text: Optional[str] = None, ppl: Callable = lambda w: None,
                    state_dir: Optional[str] = None, resume: bool = False,
                    checkpoint_every: int = 0, mesh=None, shard_params: str = "off",
                    eval_setting: Optional[dict] = None) -> tuple[ModelWeights, dict]:
    """Fine-tunes `pruned` (distilling `dense`, or on `train_text`); returns the recovered
    weights and what the manifest records. With `state_dir`, the training state is saved every
    `checkpoint_every` steps (0: never) and, with `resume`, continued from the latest one.
    `eval_setting` (EvalConfig.setting) says what `ppl` measures, so a report can tell whether
    the recorded before/after values are comparable with its own."""
    cfg.check()
    lora.check_rank(cfg.lora_rank, pruned.config) if cfg.method == "lora" else None
    ppl_before = ppl(pruned)
    teacher = decoder.from_named_arrays(dense.config, dense.named_arrays())
    started = time.time()
    ckpts = None
    if state_dir:
        if not resume and os.path.isdir(state_dir):
            shutil.rmtree(state_dir)  # an old run's resume points belong to the run being replaced
        meta = {"recover_config": dataclasses.asdict(cfg), "source": dense.source,
                "intermediate_size": pruned.config.intermediate_size}
        ckpts = orbax.TrainCheckpoints(state_dir, meta)
    resuming = ckpts is not None and resume and ckpts.latest_episode() is not None
    template = _pool_template(cfg, tokenizer, train_text) if resuming else None
    if resuming:  # the pool first (the refit fits on it), the training state once built
        _, pool, done = ckpts.restore(None, template)
        tokens, mask = pool["tokens"], pool["mask"]
    else:
        (tokens, mask), done = _pool(cfg, teacher, dense, tokenizer, train_text), 0
    gen_seconds = time.time() - started
    refit_info, start = None, pruned
    if cfg.refit:  # deterministic: a resumed run refits to the same weights
        fit_rows = slice(0, cfg.refit_rows or None)
        start, refit_info = refit.refit_down(pruned, teacher, tokens[fit_rows], mask[fit_rows])
        refit_info["ppl"] = ppl(start) if cfg.steps else None  # 0 steps: it is ppl_after
    # A teacher too big to keep beside the student: its top-k over the pool, then it is freed.
    cache = trainer.should_cache_teacher(cfg, 4 * pruned.num_params(),
                                         dense.num_params() * np.dtype(cfg.dtype()).itemsize)
    student = decoder.from_named_arrays(start.config, start.named_arrays())
    rec = Recovery(student, teacher if cfg.objective == "distill" and not cache else None, cfg,
                   mesh, shard_params)
    if resuming:
        state, _, _ = ckpts.restore(rec.state(), template)
        rec.set_state(state)
        logging.info("recovery resumes after step %d of %d", done, cfg.steps)
    cached = trainer.pool_teacher_topk(teacher, tokens, mask, cfg.teacher_topk) if cache else None
    del teacher
    bar = progress.bar(total=cfg.steps, desc="recovery", initial=done)
    seen, losses, t0 = 0, [], time.time()
    for step in range(done, cfg.steps):
        rows = data.step_rows(step, cfg.rows_per_step, len(tokens), cfg.seed)
        top = () if cached is None else (cached[0][rows], cached[1][rows])
        out = rec.step(tokens[rows], mask[rows], top)
        loss, targets = float(out["loss"]), int(out["targets"])
        seen += targets
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
        bar.update(1)
        if ckpts is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0):
            ckpts.save(step + 1, rec.state(), {"tokens": tokens, "mask": mask})
    bar.close()
    if ckpts is not None:
        ckpts.wait()
        ckpts.close()
    train_seconds = time.time() - t0
    recovered = to_weights(rec.merged_model(), pruned)
    info = run_dir.recovery_fields(
        steps=cfg.steps, objective=cfg.objective, method=cfg.method,
        tokens_seen=tokens_seen(cfg, mask),
        ppl_before=ppl_before, ppl_after=ppl(recovered), config=dataclasses.asdict(cfg),
        seconds={"sampling": round(gen_seconds, 2), "training": round(train_seconds, 2),
                 **({"refit": refit_info["seconds"]} if refit_info else {})},
        losses=[round(l, 6) for l in losses], resumed_after=done or None, eval_setting=eval_setting)
    info[run_dir.RECOVERY]["teacher_cached"] = cache
    if refit_info:
        info[run_dir.RECOVERY]["refit"] = refit_info
    return recovered, info


@dataclasses.dataclass(frozen=True)
class RecoverJob:
    """Everything launch.recover asks for."""
    input: str  # a pruned model's orbax folder, or a prune run folder (each finished output)
    out_dir: str
    config: RecoverConfig
    dense: Optional[str] = None  # default: the source recorded with the pruned model
    train_text: Optional[str] = None
    export_hf: bool = False
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 10
    eval: Optional[perplexity.EvalConfig] = None
    data_devices: int = 0  # 0: all
    shard_params: str = "auto"  # trainer.should_shard
    command: str = ""


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


def run(job: RecoverJob, make_mesh: Callable = lambda n: None) -> list:
    """Recovers every pruned model of `job.input` into `job.out_dir`; returns the manifest entries."""
    job.config.check()
    if job.config.objective == "lm" and not job.train_text:
        raise UserError("--objective=lm trains on text: pass --train_text (a path or glob)")
    inputs = pruned_inputs(job.input)
    output_folder.check_out_dir(job.out_dir, [job.input] + ([job.dense] if job.dense else []),
                         reuse=job.resume or job.overwrite)
    configs = [(p.path, orbax.load_config(p.path)) for p in inputs]
    if job.config.method == "lora":
        for _, config in configs:
            lora.check_rank(job.config.lora_rank, config)
    if job.train_text:  # an empty or missing text fails before any weights load
        from prunenet_jax.formats import texts
        texts.read_texts(job.train_text, flag="--train_text")
    dense_name = _dense_source(job, inputs[0].path)
    dense_config = sources.load_config(dense_name)
    for path, config in configs:  # shapes first (cheap); the tensors once loaded
        check_parent_shapes(config, dense_config, path, dense_name)
    mesh = make_mesh(job.data_devices)
    dense = sources.load_model(dense_name)
    needs_tokenizer = bool(job.train_text) or job.eval is not None
    tokenizer = sources.load_tokenizer(dense) if needs_tokenizer else None
    measure = (lambda w: None) if job.eval is None else (
        lambda w, f=perplexity.perplexity_fn(tokenizer, job.eval): f(w)["ppl"])
    header = run_dir.recover_header(inputs=[os.path.abspath(p.path) for p in inputs],
                                    dense=dense_name, config=dataclasses.asdict(job.config),
                                    command=job.command)
    # a run with several modes has <mode>/ratio_<r>/ outputs: keep them apart here too
    by_mode = len({p.mode for p in inputs}) > 1
    manifest = run_dir.Manifest(job.out_dir, header, resume=job.resume, by_mode=by_mode)
    entries = []
    for p in inputs:
        path, folder_mode = p.path, (p.mode if by_mode else None)
        pruned = sources.load_model(path)
        check_parent(pruned, dense, path, dense_name)
        ratio = float(p.ratio) if p.ratio is not None else 0.0
        orbax_dir, hf_dir = run_dir.output_dirs(job.out_dir, ratio, folder_mode)
        recovered, info = recover_weights(
            pruned, dense, job.config, tokenizer=tokenizer, train_text=job.train_text, ppl=measure,
            state_dir=os.path.join(job.out_dir, run_dir.RECOVER_STATE, *filter(None, [folder_mode]),
                                   run_dir.ratio_dirname(ratio)),
            resume=job.resume, checkpoint_every=job.checkpoint_every, mesh=mesh,
            shard_params=job.shard_params,
            eval_setting=job.eval and job.eval.setting())
        meta = {k: v for k, v in (orbax.read_meta(path) or {}).items()
                if k not in ("kind", "format_version", "hf_config", "dtypes", "tokenizer_dir",
                             "gguf_file", "has_kept")}
        meta.update(recovered_from=os.path.abspath(path), recovery_steps=job.config.steps,
                    recovery_objective=job.config.objective, recovery_method=job.config.method)
        save_like = dataclasses.replace(recovered, tokenizer_dir=dense.tokenizer_dir,
                                        gguf_file=dense.gguf_file)
        orbax.save_model(orbax_dir, save_like, meta, overwrite=True)
        entry = run_dir.OutputEntry(ratio=ratio, kept=recovered.config.intermediate_size,
                                    params=recovered.num_params(), ppl=info[run_dir.RECOVERY]["ppl_after"],
                                    orbax_dir=manifest.relative(orbax_dir), extra=info,
                                    recipe={"mode": p.mode, **({"guard": True} if p.guard else {})})
        if job.export_hf:
            from prunenet_jax.formats import hf

            hf.export_hf(save_like, hf_dir, model_card=orbax.model_card_fields(meta), overwrite=True)
            entry.hf_dir = manifest.relative(hf_dir)
        manifest.record(entry)
        entries.append(entry)
    return entries



def data_mesh_or_error(devices: int):
    """The data mesh over `devices` (0: all); a UserError when there are fewer."""
    from prunenet_jax.recovery.trainer import data_mesh

    if not 0 <= devices <= jax.device_count():
        raise UserError(f"--data_devices={devices} asks for more devices than the "
                        f"{jax.device_count()} present; use 1 to {jax.device_count()} (0: all)")
    return data_mesh(devices or None)


@dataclasses.dataclass(frozen=True)
class RecoverSpec:
    """Recovery as a step of launch.prune/batch_prune (--recover_steps): applied to each pruned
    output before it is written."""
    config: RecoverConfig
    train_text: Optional[str] = None
    checkpoint_every: int = 10
    resume: bool = False

    def recipe(self) -> dict:
        """What an output's recovery depends on (a changed one makes the output stale)."""
        return {**dataclasses.asdict(self.config), "train_text": self.train_text}

    def check(self, config, ratios) -> None:
        """Refuses a LoRA rank above the smallest dimension of any output, before any training."""
        if self.config.method == "lora":
            from prunenet_jax.method.sampling import num_kept

            narrowest = min(num_kept(config.intermediate_size, r) for r in ratios)
            lora.check_rank(self.config.lora_rank, dataclasses.replace(config, intermediate_size=narrowest))

    def apply(self, pruned: ModelWeights, dense: ModelWeights, *, ppl: Callable,
              state_dir: Optional[str], eval_setting: Optional[dict] = None
              ) -> tuple[ModelWeights, dict]:
        check_parent(pruned, dense, f"the output at {pruned.config.intermediate_size} channels",
                     dense.source)
        needs_tokenizer = bool(self.train_text)
        tokenizer = sources.load_tokenizer(dense) if needs_tokenizer else None
        return recover_weights(pruned, dense, self.config, tokenizer=tokenizer,
                               train_text=self.train_text, ppl=ppl, state_dir=state_dir,
                               resume=self.resume, checkpoint_every=self.checkpoint_every,
                               eval_setting=eval_setting)

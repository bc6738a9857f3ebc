"""Recovering one pruned model: `recover_weights` fine-tunes it (the training text sampled from the
dense model or the user's, the down_proj refit, then the steps), checkpointed every N steps so a
killed run resumes bit for bit (losses included) and Ctrl-C stops after a step
(resumable.Resumable); training gone non-finite stops with Diverged, before anything is saved.
`RecoverSpec` is what to do (the config, the text, checkpoints, resume): launch.recover applies it
to each of its inputs (job.py), launch.prune/batch_prune to each output (--recover_steps).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
from absl import logging

from prunenet_jax import progress, sources, special_tokens
from prunenet_jax.errors import Diverged, UserError
from prunenet_jax.formats import run_dir
from prunenet_jax.method.sampling import num_kept
from prunenet_jax.models import decoder
from prunenet_jax.recovery import data, lineage, refit, teacher_cache
from prunenet_jax.recovery import step as step_lib
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.fine_tune import Recovery
from prunenet_jax.resumable import Resumable
from prunenet_jax.weights import ModelWeights


@dataclasses.dataclass(frozen=True)
class RecoverSpec:
    """How each pruned model is recovered: the fine-tune, its text, how often its state is saved
    and whether a saved state is continued. launch.recover's job holds one; on launch.prune and
    launch.batch_prune (--recover_steps) it is applied to each pruned output before it is
    written."""
    config: RecoverConfig
    train_text: Optional[str] = None
    checkpoint_every: int = 10  # steps between saved states (0: never)
    resume: bool = False

    def recipe(self) -> dict:
        """What an output's recovery depends on (a changed one makes the output stale)."""
        return {**dataclasses.asdict(self.config), "train_text": self.train_text}

    def check(self, config=None, ratios=()) -> None:
        """Refuses bad values and an unreadable or missing text, before anything is loaded; with a
        model's `config`, also a LoRA rank above the smallest dimension of any output (pruned at
        `ratios`), before any training."""
        self.config.check()
        self.config.check_text(self.train_text)
        self.config.check_pool(self.train_text)
        if self.checkpoint_every < 0:
            raise UserError(f"--recover_checkpoint_every={self.checkpoint_every} must be >= 0")
        if config is not None:
            narrowest = min((num_kept(config.intermediate_size, r) for r in ratios),
                            default=config.intermediate_size)
            self.config.check_model(dataclasses.replace(config, intermediate_size=narrowest))

    def apply(self, pruned: ModelWeights, dense: ModelWeights, *, ppl: Callable,
              state_dir: Optional[str], eval_setting: Optional[dict] = None
              ) -> tuple[ModelWeights, dict]:
        """`pruned` (an output of `dense`) recovered: (weights, what the manifest records)."""
        lineage.check_parent(pruned, dense, f"the output at {pruned.config.intermediate_size} "
                             "channels", dense.source)
        tokenizer = sources.load_tokenizer(dense) if self.train_text else None
        return recover_weights(pruned, dense, self, tokenizer=tokenizer, ppl=ppl,
                               state_dir=state_dir, eval_setting=eval_setting)


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
    bos = special_tokens.bos_id(dense, lambda: tokenizer)
    if bos is None:
        raise UserError(f"{dense.source} names no BOS token to start sampling from; use "
                        "--objective=lm with --train_text")
    return data.generated_pool(teacher, bos, special_tokens.eos_ids(dense, lambda: tokenizer),
                               cfg.generated_rows(), cfg.seq_len, seed=cfg.seed)


def _history_template(cfg: RecoverConfig, tokenizer, train_text: Optional[str]) -> Callable:
    """The shapes of a checkpoint's history (orbax restores into them): the pool, and the loss of
    each step done."""
    rows = cfg.generated_rows()
    if train_text:  # cheap to rebuild
        rows = len(data.text_pool(tokenizer, train_text, cfg.seq_len)[0])
    return lambda done: {"tokens": np.zeros((rows, cfg.seq_len), np.int32),
                         "mask": np.zeros((rows, cfg.seq_len), np.int32),
                         "losses": np.zeros((done,), np.float32)}


def _warn_if_short_text(cfg: RecoverConfig, mask: np.ndarray, pruned: ModelWeights) -> None:
    """One warning line when --train_text has fewer tokens than one step trains on, or than the
    refit has unknowns per output (the kept channels): fitting so little text overfits it."""
    have, kept = int(mask.sum()), pruned.config.intermediate_size
    step_tokens = cfg.rows_per_step * cfg.seq_len
    needs = []
    if cfg.steps:
        needs.append((step_tokens, f"one training step takes {step_tokens} (--train_batch x "
                                   "--grad_accum x --train_seq_len)"))
    if cfg.refit:
        needs.append((kept, f"the refit fits {kept} channels per layer, which needs at least {kept}"))
    short = [(n, why) for n, why in needs if have < n]
    if short:
        progress.warning(f"--train_text has {have} tokens, but {' and '.join(w for _, w in short)}: "
                         "training on so little text fits that text alone and can make the model "
                         f"worse; pass a longer text (at least {max(n for n, _ in short)} tokens)")


def _warn_if_worse(refit_info: dict, ppl_before, ppl_refit, pruned: ModelWeights) -> None:
    """One warning line when the refit made the model worse (refit.harm), saying what to do."""
    worse = refit.harm(refit_info, ppl_before, ppl_refit)
    if worse:
        progress.warning(f"recovery of the model with {pruned.config.intermediate_size} channels "
                         f"per layer: {worse}; rerun with --norefit to skip the refit (docs/"
                         "recovery.md, \"Measured with the refit\")")


def tokens_seen(cfg: RecoverConfig, mask: np.ndarray) -> int:
    """Target tokens (predicted positions) of every step of the run."""
    targets = (mask[:, 1:] * mask[:, :-1]).sum(axis=1)
    return int(sum(targets[data.step_rows(s, cfg.rows_per_step, len(mask), cfg.seed)].sum()
                   for s in range(cfg.steps)))


def _diverged(what: str, step: int, cfg: RecoverConfig, pruned: ModelWeights,
              loop: Resumable) -> Diverged:
    """The error that stops a recovery gone non-finite: what, at which learning rate, what to
    lower, and where the last good checkpoint is (nothing of this model is written)."""
    lr = float(step_lib.lr_schedule(cfg)(step))
    kept = (f"the last good training checkpoint (after step {loop.last_saved}) is kept in "
            f"{loop.directory}" if loop.last_saved else "no training checkpoint was saved")
    lower = "--recover_lr or --lora_alpha" if cfg.method == "lora" else "--recover_lr"
    return Diverged(f"recovery of the model with {pruned.config.intermediate_size} channels per "
                    f"layer diverged: {what}, at learning rate {lr:.3g} (peak --recover_lr="
                    f"{cfg.lr:g}); lower {lower} (and --weight_decay or --clip_norm if raised) and "
                    f"rerun; nothing was written for this model, and {kept}")


def _check_finite(recovered: ModelWeights, cfg: RecoverConfig, pruned: ModelWeights,
                  loop: Resumable) -> None:
    """Diverged when a tensor of the recovered weights holds NaN or Inf (before anything is
    written): made by the steps, or by the refit alone (0 steps)."""
    bad = next((n for n, a in recovered.named_arrays() if not np.isfinite(a).all()), None)
    if bad is None:
        return
    if cfg.steps:
        raise _diverged(f"the recovered weights hold NaN or Inf ({bad}) after {cfg.steps} steps",
                        cfg.steps - 1, cfg, pruned, loop)
    raise Diverged(f"the down_proj refit of the model with {pruned.config.intermediate_size} "
                   f"channels per layer made weights of NaN or Inf ({bad}); nothing was written "
                   "for this model; train without the refit instead (--norefit --recover_steps=N)")


def _train(rec: Recovery, loop: Resumable, cfg: RecoverConfig, pruned: ModelWeights, pool: dict,
           cached, done: int, losses: list) -> None:
    """Steps `done`..cfg.steps, each loss appended to `losses`; a non-finite loss, gradient norm
    or trained parameter (checked before each save) stops the run with Diverged."""
    tokens, mask = pool["tokens"], pool["mask"]

    def checkpoint(steps_done: int) -> tuple:
        if not rec.params_finite():
            raise _diverged(f"after step {steps_done} of {cfg.steps} the trained parameters hold "
                            "NaN or Inf", steps_done - 1, cfg, pruned, loop)
        return rec.state(), {**pool, "losses": np.asarray(losses, np.float32)}

    seen, t0 = 0, time.time()
    loop.start(done)
    for step in range(done, cfg.steps):
        rows = data.step_rows(step, cfg.rows_per_step, len(tokens), cfg.seed)
        top = () if cached is None else (cached[0][rows], cached[1][rows])
        out = rec.step(tokens[rows], mask[rows], top)
        loss, gnorm = float(out["loss"]), float(out["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise _diverged(f"at step {step + 1} of {cfg.steps} the loss is {loss:g} and the "
                            f"gradient norm {gnorm:g}", step, cfg, pruned, loop)
        seen += int(out["targets"])
        losses.append(loss)
        loop.advance(loss=f"{loss:.4f}", tok_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
        loop.finished(step + 1, lambda: checkpoint(step + 1))


def recover_weights(pruned: ModelWeights, dense: ModelWeights, spec: RecoverSpec, *, tokenizer,
                    ppl: Callable = lambda w: None, state_dir: Optional[str] = None, mesh=None,
                    shard_params: str = "off", eval_setting: Optional[dict] = None
                    ) -> tuple[ModelWeights, dict]:
    """Fine-tunes `pruned` (distilling `dense`, or on `spec.train_text`); returns the recovered
    weights and what the manifest records. With `state_dir`, the training state (with the loss
    history) is saved every `spec.checkpoint_every` steps (and on Ctrl-C) and, with
    `spec.resume`, continued from the latest one. Training gone non-finite raises Diverged (no
    bad state is saved, nor returned). `eval_setting` (EvalConfig.setting) says what `ppl`
    measures, so a report can tell whether the recorded before/after values are comparable with
    its own."""
    cfg, train_text = spec.config, spec.train_text
    cfg.check()
    cfg.check_pool(train_text)
    cfg.check_model(pruned.config)
    ppl_before = ppl(pruned)
    teacher = decoder.from_named_arrays(dense.config, dense.named_arrays())
    started = time.time()
    meta = {"recover_config": dataclasses.asdict(cfg), "source": dense.source,
            "intermediate_size": pruned.config.intermediate_size,
            "history": "pool and losses"}  # what a checkpoint's history holds
    with Resumable(state_dir, meta, resume=spec.resume, total=cfg.steps,
                   every=spec.checkpoint_every, unit="step", desc="recovery") as loop:
        template = _history_template(cfg, tokenizer, train_text) if loop.resuming else None
        if loop.resuming:  # the pool first (the refit fits on it), the training state once built
            _, history, done = loop.restore(None, template)
            tokens, mask = history["tokens"], history["mask"]
            losses = [float(l) for l in history["losses"]]
        else:
            (tokens, mask), done, losses = _pool(cfg, teacher, dense, tokenizer, train_text), 0, []
        if train_text:
            _warn_if_short_text(cfg, mask, pruned)
        gen_seconds = time.time() - started
        refit_info, start = None, pruned
        if cfg.refit:  # deterministic: a resumed run refits to the same weights
            fit_rows = slice(0, cfg.refit_rows or None)
            start, refit_info = refit.refit_down(pruned, teacher, tokens[fit_rows], mask[fit_rows])
            refit_info["ppl"] = ppl(start) if cfg.steps else None  # 0 steps: it is ppl_after
            if cfg.steps or ppl_before is None:  # else judged by ppl_after, below
                _warn_if_worse(refit_info, ppl_before, refit_info["ppl"], pruned)
        # A teacher too big to keep beside the student: its top-k over the pool, then it is freed.
        cache = teacher_cache.should_cache_teacher(
            cfg, 4 * pruned.num_params(), dense.num_params() * np.dtype(cfg.dtype()).itemsize)
        student = decoder.from_named_arrays(start.config, start.named_arrays())
        rec = Recovery(student, teacher if cfg.objective == "distill" and not cache else None, cfg,
                       mesh, shard_params)
        if loop.resuming:
            state, _, _ = loop.restore(rec.state(), template)
            rec.set_state(state)
            logging.info("recovery resumes after step %d of %d", done, cfg.steps)
        cached = (teacher_cache.pool_teacher_topk(teacher, tokens, mask, cfg.teacher_topk)
                  if cache else None)
        del teacher
        t0 = time.time()
        _train(rec, loop, cfg, pruned, {"tokens": tokens, "mask": mask}, cached, done, losses)
    train_seconds = time.time() - t0
    recovered = to_weights(rec.merged_model(), pruned)
    _check_finite(recovered, cfg, pruned, loop)
    ppl_after = ppl(recovered)
    if refit_info and not cfg.steps and ppl_before is not None:  # the refit alone
        _warn_if_worse(refit_info, ppl_before, ppl_after, pruned)
    info = run_dir.recovery_fields(
        steps=cfg.steps, objective=cfg.objective, method=cfg.method,
        tokens_seen=tokens_seen(cfg, mask),
        ppl_before=ppl_before, ppl_after=ppl_after, config=dataclasses.asdict(cfg),
        seconds={"sampling": round(gen_seconds, 2), "training": round(train_seconds, 2),
                 **({"refit": refit_info["seconds"]} if refit_info else {})},
        losses=[round(l, 6) for l in losses], resumed_after=done or None, eval_setting=eval_setting)
    info[run_dir.RECOVERY]["teacher_cached"] = cache
    if refit_info:
        info[run_dir.RECOVERY]["refit"] = refit_info
    return recovered, info

"""Recovering one pruned model: `recover_weights` fine-tunes it (the training text sampled from the
dense model or the user's, the down_proj refit, then the steps), checkpointed every N steps so a
killed run resumes bit for bit and Ctrl-C stops after a step (resumable.Resumable).
`RecoverSpec` is what to do (the config, the text, checkpoints, resume): launch.recover applies it
to each of its inputs (job.py), launch.prune/batch_prune to each output (--recover_steps).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np
from absl import logging

from prunenet_jax import progress, sources, special_tokens
from prunenet_jax.errors import UserError
from prunenet_jax.formats import run_dir
from prunenet_jax.method.sampling import num_kept
from prunenet_jax.models import decoder
from prunenet_jax.recovery import data, lineage, refit, teacher_cache
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


def _pool_template(cfg: RecoverConfig, tokenizer, train_text: Optional[str]) -> Callable:
    """The shapes of a checkpointed pool (orbax restores into them)."""
    rows = cfg.generated_rows()
    if train_text:  # cheap to rebuild
        rows = len(data.text_pool(tokenizer, train_text, cfg.seq_len)[0])
    return lambda _: {k: np.zeros((rows, cfg.seq_len), np.int32) for k in ("tokens", "mask")}


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


def recover_weights(pruned: ModelWeights, dense: ModelWeights, spec: RecoverSpec, *, tokenizer,
                    ppl: Callable = lambda w: None, state_dir: Optional[str] = None, mesh=None,
                    shard_params: str = "off", eval_setting: Optional[dict] = None
                    ) -> tuple[ModelWeights, dict]:
    """Fine-tunes `pruned` (distilling `dense`, or on `spec.train_text`); returns the recovered
    weights and what the manifest records. With `state_dir`, the training state is saved every
    `spec.checkpoint_every` steps (and on Ctrl-C) and, with `spec.resume`, continued from the
    latest one. `eval_setting` (EvalConfig.setting) says what `ppl` measures, so a report can
    tell whether the recorded before/after values are comparable with its own."""
    cfg, train_text = spec.config, spec.train_text
    cfg.check()
    cfg.check_model(pruned.config)
    ppl_before = ppl(pruned)
    teacher = decoder.from_named_arrays(dense.config, dense.named_arrays())
    started = time.time()
    meta = {"recover_config": dataclasses.asdict(cfg), "source": dense.source,
            "intermediate_size": pruned.config.intermediate_size}
    with Resumable(state_dir, meta, resume=spec.resume, total=cfg.steps,
                   every=spec.checkpoint_every, unit="step", desc="recovery") as loop:
        template = _pool_template(cfg, tokenizer, train_text) if loop.resuming else None
        if loop.resuming:  # the pool first (the refit fits on it), the training state once built
            _, pool, done = loop.restore(None, template)
            tokens, mask = pool["tokens"], pool["mask"]
        else:
            (tokens, mask), done = _pool(cfg, teacher, dense, tokenizer, train_text), 0
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
        pool = {"tokens": tokens, "mask": mask}
        seen, losses, t0 = 0, [], time.time()
        loop.start(done)
        for step in range(done, cfg.steps):
            rows = data.step_rows(step, cfg.rows_per_step, len(tokens), cfg.seed)
            top = () if cached is None else (cached[0][rows], cached[1][rows])
            out = rec.step(tokens[rows], mask[rows], top)
            loss, targets = float(out["loss"]), int(out["targets"])
            seen += targets
            losses.append(loss)
            loop.advance(loss=f"{loss:.4f}", tok_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
            loop.finished(step + 1, lambda: (rec.state(), pool))
    train_seconds = time.time() - t0
    recovered = to_weights(rec.merged_model(), pruned)
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

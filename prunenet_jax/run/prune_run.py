"""One pruning run (launch.prune): load a model, train (or reuse) a policy and/or measure channel
scores (energy), prune at several ratios with every mode asked for, write each sliced model as an
orbax checkpoint (and optionally an HF folder) into the run folder, and record it in the manifest
(formats/run_dir.py). With an eval text, every output gets perplexity and top-1 accuracy (and its
retention against the dense model), and each ratio a uniform-random baseline (one seeded draw).

`prune_at_ratios` is shared with run/batch.py (many models, one policy). Every output folder is
written under a temporary name and renamed when complete, and the manifest is rewritten
atomically after each output, so an interrupted run is resumed by skipping what is done.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from prunenet_jax import prune, rng, sources
from prunenet_jax.errors import UserError
from prunenet_jax.files import output_folder, run_lock
from prunenet_jax import perplexity
from prunenet_jax.formats import orbax
from prunenet_jax.method import calibration as calibration_lib
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import compensated, sampling, trainer
from prunenet_jax.method import scores as scores_lib
from prunenet_jax.method.episode import TrainConfig
from prunenet_jax.models import registry
from prunenet_jax.formats import gguf_export, run_dir
from prunenet_jax.formats.run_dir import Manifest, OutputEntry
from prunenet_jax.weights import ModelWeights


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """How outputs are made: the selection modes (each prunes at every ratio), the guard, and what
    is written."""
    modes: tuple = ("sample",)
    seed: int = 42
    export_hf: bool = False
    torch_format: bool = False
    export_gguf: bool = False
    gguf_type: str = "f16"  # formats/gguf_export.GGUF_TYPES
    guard: bool = False
    recover: Optional["RecoverSpec"] = None  # --recover_steps: fine-tune each output before writing

    def check(self, out_dir: Optional[str]) -> None:
        """Refuses options that cannot work together or bad values, before anything is loaded."""
        if self.torch_format and not self.export_hf:
            raise UserError("--torch_format adds pytorch_model.bin to the HF export; pass "
                            "--export_hf too")
        if self.export_hf and not out_dir:
            raise UserError("--export_hf needs --out_dir")
        if self.export_gguf and not out_dir:
            raise UserError("--export_gguf needs --out_dir")
        gguf_export.check_type(self.gguf_type)
        rng.check_seed(self.seed)
        if self.recover is not None:
            self.recover.check()

    @property
    def needs_policy(self) -> bool:
        return any(m in prune.POLICY_MODES for m in self.modes)

    @property
    def needs_scores(self) -> bool:
        return any(m in prune.SCORE_MODES for m in self.modes)

    def folder_mode(self, mode: str) -> Optional[str]:
        """The mode's folder level (run_dir.output_dirs): only when the run has several modes, so
        a one-mode run keeps the layout ratio_<r>/."""
        return mode if len(self.modes) > 1 else None

    def recipe(self, mode: str, params: Optional[dict], scores=None) -> dict:
        """What an output depends on besides the model and ratio (see run_dir.RECIPE_FIELDS)."""
        return run_dir.recipe(
            policy_lib.fingerprint(params) if mode in prune.POLICY_MODES else None, mode,
            self.seed, self.export_hf, self.torch_format,
            None if self.recover is None else self.recover.recipe(), self.guard,
            scores.meta["calibration"] if mode in prune.SCORE_MODES and scores else None,
            self.gguf_type if self.export_gguf else None)

    def check_exportable(self, config, source: str, revision: Optional[str] = None) -> None:
        """With --export_gguf: refuses, before any training, a model whose GGUF file cannot be
        written (gguf_export.check_exportable)."""
        if self.export_gguf:
            gguf_file, tokenizer_dir = sources.tokenizer_location(source, revision)
            gguf_export.check_exportable(config, gguf_file=gguf_file, tokenizer_dir=tokenizer_dir,
                                         source=source)



def selection_note(mode: str, scores=None) -> str:
    """How a mode chose the channels, for the model card: what it ran and on what data."""
    if mode in prune.POLICY_MODES:
        return ("PruneNet policy (spectral reward on the gate weights): no forward pass, no data")
    if mode == "random":
        return "uniform random channels (a baseline)"
    cal = scores.meta["calibration"]
    text = ("tokens the dense model generated itself from its start token (no external data)"
            if cal["source"] == calibration_lib.SELF else f"tokens of the text {cal['source']}")
    if mode == "compensated":
        return (f"per layer, greedy structured OBS or energy channels with the kept down_proj "
                f"columns re-fitted, the candidate and its damping chosen on held-out rows of "
                f"{scores.meta['tokens']} {text}")
    return (f"top-k of E[h_j^2] * ||down[:, j]||^2, measured by forward passes of the dense model "
            f"over {scores.meta['tokens']} {text}")


def calibration_tokens(weights: ModelWeights, scores: Optional[scores_lib.Scores],
                       cal: calibration_lib.Calibration, folder: Optional[str]):
    """What `Selection` calls for the calibration tokens: the ones the scores were just measured
    on, else those saved in `folder`, else calibrated again (same seed, same tokens)."""
    def tokens():
        if scores is not None and scores.tokens is not None:
            return scores.tokens
        return calibration_lib.tokens_for(weights, cal, lambda: sources.load_tokenizer(weights),
                                          folder)[0]
    return tokens


class Selection:
    """Kept channels of one model for every mode and ratio: the policy's, random, or by scores,
    with the guard when asked for. `calibration_tokens()`: the scores' calibration tokens
    (`compensated` walks them layer by layer), called once, when that mode runs."""

    def __init__(self, weights: ModelWeights, params: Optional[dict], options: OutputOptions,
                 scores: Optional[scores_lib.Scores] = None,
                 calibration_tokens: Optional[Callable[[], np.ndarray]] = None):
        self.weights, self.params, self.options, self.scores = weights, params, options, scores
        self._gate = self._guard = None
        self._tokens = calibration_tokens and functools.cache(calibration_tokens)

    def prune(self, mode: str, ratio: float) -> tuple[np.ndarray, ModelWeights, dict]:
        """(kept channels, the pruned model, what the manifest records of the selection)."""
        if mode != "compensated":
            kept = self.kept(mode, ratio)
            return kept, prune.slice_weights(self.weights, kept), {}
        tokens = self._tokens()
        if len(tokens) < 2:
            raise UserError(f"--mode=compensated holds out calibration rows to choose its fit, and "
                            f"the calibration has {len(tokens)} row; pass --calibration_sequences=2 "
                            "or more (or a longer --calibration text)")
        k = sampling.num_kept(self.weights.config.intermediate_size, ratio)
        kept, columns, info = compensated.select(self.weights, tokens, k, guard=self.guard(mode))
        return kept, prune.slice_weights(self.weights, kept, columns), {"compensation": info}

    def guard(self, mode: str):
        if not self.options.guard:
            return None
        if self._guard is None:
            self._guard = scores_lib.weight_guard(self.weights)
        return self.scores.guard(self.weights) if mode in prune.SCORE_MODES else self._guard

    def kept(self, mode: str, ratio: float):
        if self._gate is None:  # on the device once for all ratios (GBs on a 7B model)
            self._gate = jax.device_put(self.weights.layers[registry.scored(self.weights.config)])
        energy = self.scores.energy if mode in prune.SCORE_MODES else None
        return prune.select_kept(self.params, self._gate, ratio, mode, self.options.seed,
                                 guard=self.guard(mode), scores=energy)


@dataclasses.dataclass(frozen=True)
class Training:
    """How a policy is trained (when none is given)."""
    config: TrainConfig
    episodes: int = 20
    checkpoint_every: int = 1

    def check(self) -> None:
        """Refuses bad values, before anything is loaded (the ratio: `train_ratio`)."""
        if self.episodes < 1:
            raise UserError(f"--episodes={self.episodes}: train for at least 1 episode")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint_every={self.checkpoint_every} must be at least 1")
        lr, gamma = self.config.learning_rate, self.config.gamma
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr={lr} must be a finite number > 0, e.g. 1e-3")
        if not 0.0 <= gamma <= 1.0:  # also refuses nan
            raise UserError(f"--gamma={gamma} must be a discount in [0, 1], e.g. 0.99")


def train_ratio(ratios, ratio: Optional[float] = None) -> float:
    """The ratio a policy is trained at: `ratio` (--train_ratio), or the largest of `ratios`.
    Refused here, before a TrainConfig (which would refuse it without naming the flag) is made."""
    if ratio is None:
        return max(ratios)
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"--train_ratio={ratio} is outside [0, 1); pass a ratio such as 0.3, or "
                        "omit it (the largest of --ratios)")
    return ratio


@dataclasses.dataclass(frozen=True)
class PruneJob:
    """Everything launch.prune asks for."""
    model: str
    ratios: tuple
    training: Training
    outputs: OutputOptions
    revision: Optional[str] = None
    out_dir: Optional[str] = None
    policy: Optional[str] = None  # a saved policy folder: no training
    resume: bool = False
    eval: Optional[perplexity.EvalConfig] = None
    calibration: calibration_lib.Calibration = calibration_lib.Calibration()
    scores: Optional[str] = None  # saved scores (<run>/scores): no calibration forward pass
    overwrite: bool = False  # replace an earlier run's outputs in out_dir
    process_id: Optional[int] = None  # multi-host: this process (only process 0 writes and locks)
    command: str = ""

    def check(self) -> None:
        """Refuses what cannot work, before anything is loaded or created."""
        self.training.check()
        self.outputs.check(self.out_dir)
        run_dir.check_resume(self.out_dir, self.resume, self.overwrite)
        self.check_out_dir()
        if self.outputs.needs_scores:
            self.calibration.check(held_out="compensated" in self.outputs.modes)
        elif self.scores:  # it would be silently ignored
            raise UserError(f"--scores={self.scores} is used only by --mode="
                            f"{','.join(prune.SCORE_MODES)}, and --mode={','.join(self.outputs.modes)} "
                            "uses no scores; add energy (or compensated) to --mode, or drop --scores")
        if self.eval is not None:
            self.eval.check()

    def check_out_dir(self) -> None:
        """The output-folder policy: a new or empty folder, or one to --resume or --overwrite."""
        if self.out_dir:
            inputs = [self.model] + [p for p in (self.policy, self.scores) if p]
            output_folder.check_out_dir(self.out_dir, inputs, reuse=self.resume or self.overwrite)


def check_ratios_fit(intermediate_size: int, ratios, source: str) -> None:
    """Refuses a ratio that keeps no channel of this model."""
    for r in ratios:
        try:
            sampling.num_kept(intermediate_size, r)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None


class Measure:
    """Perplexity and top-1 next-token accuracy of models, scored with the dense model's tokenizer;
    `dense` is the dense model's (None without an eval config)."""

    def __init__(self, weights: ModelWeights, cfg: Optional[perplexity.EvalConfig]):
        self.fn = cfg and perplexity.perplexity_fn(sources.load_tokenizer(weights), cfg)
        self.dense = self.fn(weights) if self.fn else None
        self.setting = cfg.setting() if cfg else None  # what the ppl values are comparable by

    def __call__(self, weights: ModelWeights) -> dict:
        """{"ppl", "accuracy", "accuracy_retention"} (pruned / dense accuracy), or {}."""
        if not self.fn:
            return {}
        result = self.fn(weights)
        return {"ppl": result["ppl"], "accuracy": result["accuracy"],
                "accuracy_retention": perplexity.accuracy_retention(result["accuracy"],
                                                                    self.dense["accuracy"])}


def prune_at_ratios(weights: ModelWeights, selection: Selection, ratios, options: OutputOptions, *,
                    out_dir: Optional[str], manifest: Optional[Manifest],
                    measure: Optional[Measure] = None,
                    card: Optional[dict] = None, checkpoint: Optional[str] = None,
                    extra: Optional[dict] = None,
                    on_output: Callable[[OutputEntry], None] = lambda e: None) -> list[OutputEntry]:
    """Prunes `weights` at every ratio with every mode; with `out_dir`, writes
    `<out_dir>/[<mode>/]ratio_<r>/orbax` (and `/hf`) and records each output in `manifest` (as
    batch item `checkpoint`, with the `extra` fields); outputs the manifest already has done by the
    same recipe are skipped. Returns the entries in (ratio, mode) order."""
    dense_params = weights.num_params()
    measure = measure or Measure(weights, None)  # no eval config: measures nothing
    entries = []
    for r, mode in ((r, m) for r in ratios for m in options.modes):
        made_by = options.recipe(mode, selection.params, selection.scores)
        if manifest is not None and manifest.is_done(r, made_by, checkpoint):
            entries.append(manifest.find(r, checkpoint, mode))
            on_output(entries[-1])
            continue
        kept, pruned, selected = selection.prune(mode, r)
        k = int(kept.shape[1])
        meta = {**(card or {}), "policy_fingerprint": made_by["policy_fingerprint"],
                "mode": mode, "guard": options.guard, "selection": selection_note(mode, selection.scores),
                "calibration": made_by.get("calibration"), "seed": options.seed, "ratio": r,
                "kept": k, "params_before": dense_params, "params_after": pruned.num_params()}
        entry = OutputEntry(ratio=r, kept=k, params=pruned.num_params(), checkpoint=checkpoint,
                            recipe=made_by, extra={**(extra or {}), **selected})
        scored = None
        if options.recover is not None:
            measured = {}

            def ppl(w):  # keeps the last model's measures: the recovered model's, scored once
                measured.clear()
                measured.update(measure(w))
                return measured.get("ppl")

            state_dir = out_dir and os.path.join(out_dir, run_dir.RECOVER_STATE,
                                                 *filter(None, [options.folder_mode(mode)]),
                                                 run_dir.ratio_dirname(r))
            pruned, recovered = options.recover.apply(pruned, weights, ppl=ppl, state_dir=state_dir,
                                                      eval_setting=measure.setting)
            entry.extra.update(recovered)
            scored = measured
        if out_dir is not None:
            orbax_dir, hf_dir, gguf_dir = run_dir.output_dirs(out_dir, r, options.folder_mode(mode),
                                                              manifest and manifest.folder)
            rel = manifest.relative if manifest else (lambda p: p)
            orbax.save_model(orbax_dir, pruned, meta, kept=kept, overwrite=True)
            entry.orbax_dir = rel(orbax_dir)
            if options.export_hf:

                from prunenet_jax.formats import hf_export
                hf_export.export_hf(pruned, hf_dir, model_card=orbax.model_card_fields(meta),
                             torch_format=options.torch_format, overwrite=True)
                entry.hf_dir = rel(hf_dir)
            if options.export_gguf:
                gguf_export.export_gguf(pruned, gguf_dir, gguf_type=options.gguf_type,
                                        model_card=orbax.model_card_fields(meta), overwrite=True)
                entry.gguf_dir = rel(gguf_dir)
        scored = measure(pruned) if scored is None else dict(scored)
        entry.ppl = scored.pop("ppl", None)
        entry.extra.update(scored)
        if manifest is not None:
            manifest.record(entry)
        entries.append(entry)
        on_output(entry)
        del pruned
    return entries


def random_baseline(weights: ModelWeights, selection: Selection, ratios, measure: Measure,
                    entries: list[OutputEntry]) -> dict:
    """{ratio: {"ppl", "accuracy", "accuracy_retention"}} of one seeded uniform-random slicing
    (the seed's random-mode channels, unguarded): whether a selection beat chance. Reuses the
    run's own unguarded `random` outputs."""
    if measure.fn is None:
        return {}
    found = {}
    for r in ratios:
        own = next((e for e in entries if e.ratio == r and e.recipe.get("mode") == "random"
                    and not e.recipe.get("guard") and e.ppl is not None), None)
        if own is not None:
            found[str(r)] = {"ppl": own.ppl, **{k: own.extra.get(k) for k in
                                                ("accuracy", "accuracy_retention")}}
            continue
        kept = prune.select_kept(None, weights.layers[registry.scored(weights.config)], r, "random",
                                 selection.options.seed)
        found[str(r)] = measure(prune.slice_weights(weights, kept))
    return found


@dataclasses.dataclass
class PruneResult:
    header: dict  # the manifest's run-level fields
    outputs: list  # OutputEntry per (ratio, mode)
    dense_params: int
    dense_ppl: Optional[float]
    dense_accuracy: Optional[float] = None
    baseline: Optional[dict] = None  # random_baseline's

    def to_json(self) -> dict:
        return run_dir.manifest_json(self.header, self.outputs)

    def format_table(self) -> str:
        """One row per (ratio, mode), then the uniform-random baseline at each ratio."""
        fmt = lambda v, f=".3f": "-" if v is None else format(v, f)
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
        dense = self.dense_params
        lines = [f"{'ratio':>6}  {'mode':<24}  {'kept':>6}  {'params':>13}  {'of dense':>8}  "
                 f"{'ppl':>10}  {'top-1 acc':>9}  {'retained':>8}",
                 f"{'dense':>6}  {'':<24}  {'':>6}  {dense:>13,}  {'100.0%':>8}  "
                 f"{fmt(self.dense_ppl):>10}  {fmt(self.dense_accuracy, '.4f'):>9}  {'':>8}"]
        guard = " +guard" if self.header.get("guard") else ""
        for r in self.outputs:
            mode = (r.recipe.get("mode") or "") + (guard if r.recipe.get("guard") else "")
            lines.append(f"{run_dir.format_ratio(r.ratio):>6}  {mode:<24}  {r.kept:>6}  "
                         f"{r.params:>13,}  {100 * r.params / dense:>7.1f}%  {fmt(r.ppl):>10}  "
                         f"{fmt(r.extra.get('accuracy'), '.4f'):>9}  "
                         f"{pct(r.extra.get('accuracy_retention')):>8}")
        for ratio, b in (self.baseline or {}).items():
            lines.append(f"{run_dir.format_ratio(float(ratio)):>6}  {'random baseline (1 draw)':<24}  "
                         f"{'':>6}  {'':>13}  {'':>8}  {fmt(b.get('ppl')):>10}  "
                         f"{fmt(b.get('accuracy'), '.4f'):>9}  {pct(b.get('accuracy_retention')):>8}")
        return "\n".join(lines)


def run(job: PruneJob, start_devices: Callable[[], Optional[jax.sharding.Mesh]]) -> Optional[PruneResult]:
    """The whole run. `job` is checked (PruneJob.check) before anything is created, then its
    out_dir locked (process 0; files/run_lock.py) and checked again under the lock, since
    another run may have filled it meanwhile. Everything cheap is checked before
    `start_devices()` (jax.distributed and the mesh) and before any weights are read. Returns
    None on processes other than 0 (they only train; process 0 measures scores, prunes,
    evaluates and writes)."""
    job.check()
    if not job.process_id:
        prune.warn_if_sample_alone(job.outputs.modes)
    with run_lock.hold(job.out_dir if not job.process_id else None):
        job.check_out_dir()
        return _run(job, start_devices)


def _run(job: PruneJob, start_devices) -> Optional[PruneResult]:
    cfg, options = job.training.config, job.outputs
    train = options.needs_policy and not job.policy
    policy = orbax.load_policy(job.policy) if job.policy and options.needs_policy else None
    # The model's config is cheap to read: shape errors surface before the weights are loaded.
    config = sources.load_config(job.model, revision=job.revision)
    check_ratios_fit(config.intermediate_size, list(job.ratios) + [cfg.ratio] * train, job.model)
    if job.eval is not None:
        job.eval.check_model(config, job.model)
    if job.outputs.recover is not None:
        job.outputs.recover.check(config, job.ratios)
    options.check_exportable(config, job.model, job.revision)
    if policy is not None:
        orbax.check_policy_fits(policy[1], config, job.model, job.policy)
    if job.scores and options.needs_scores:
        scores_lib.check_fits(orbax.scores_meta(job.scores), [config.num_hidden_layers,
                              config.intermediate_size, config.hidden_size], job.model, job.scores)
    mesh = start_devices()
    logging.info("mesh: %d devices over %d processes", 1 if mesh is None else mesh.size,
                 jax.process_count())
    if not train and jax.process_index() != 0:
        return None  # nothing to train: process 0 prunes, evaluates and writes
    if jax.process_index() == 0:
        weights = sources.load_model(job.model, revision=job.revision)
        config, W = weights.config, weights.layers[registry.scored(weights.config)]
        if weights.gguf_file is None and policy is None:
            # training reads the gate matrices as stored (bf16 stays bf16 on the device), streamed a
            # layer at a time from the memory-mapped file; a GGUF's are dequantised to fp32 anyway
            _, W = sources.load_gate_stack(job.model, revision=job.revision)
    else:  # other hosts only train: they read just their own layers' gate matrices, lazily
        weights = None
        config, W = sources.load_gate_stack(job.model, revision=job.revision)
    logging.info("loaded %s: %d layers, I=%d, H=%d", job.model, config.num_hidden_layers,
                 config.intermediate_size, config.hidden_size)

    scores, scores_info = None, None
    if options.needs_scores and weights is not None:  # before training: its errors come first
        scores, computed = scores_lib.obtain(
            weights, job.calibration, lambda: sources.load_tokenizer(weights),
            scores_path=job.scores, folder=job.out_dir,
            mesh=mesh if jax.process_count() == 1 else None)
        scores_info = {"path": os.path.abspath(job.scores) if job.scores else
                       (scores_lib.SCORES if job.out_dir else None),
                       "computed": computed, **scores.meta}
    params, training = None, None
    if policy is not None:
        params, training = policy[0], {"policy": os.path.abspath(job.policy)}
    elif train:
        params, training = trainer.train_policy(
            W, config, cfg, seed=options.seed, episodes=job.training.episodes, mesh=mesh,
            state_dir=job.out_dir and os.path.join(job.out_dir, run_dir.TRAIN_STATE),
            policy_dir=job.out_dir and os.path.join(job.out_dir, run_dir.POLICY),
            resume=job.resume, source=job.model, checkpoint_every=job.training.checkpoint_every)
        if weights is None:
            return None  # process 0 prunes, evaluates and writes
    measure = Measure(weights, job.eval)
    dense = measure.dense or {}
    header = run_dir.prune_header(
        model=job.model,
        policy_dir=None if params is None else run_dir.POLICY if train else os.path.abspath(job.policy),
        fingerprint=None if params is None else policy_lib.fingerprint(params), seed=options.seed,
        mode=",".join(options.modes),
        train_ratio=None if params is None else cfg.ratio if train else policy[1]["train_config"]["ratio"],
        dense_params=weights.num_params(), dense_ppl=dense.get("ppl"), training=training,
        command=job.command, guard=options.guard, scores=scores_info,
        dense_accuracy=dense.get("accuracy"))
    manifest = (Manifest(job.out_dir, header, resume=job.resume, by_mode=len(options.modes) > 1)
                if job.out_dir else None)
    selection = Selection(weights, params, options, scores,
                          calibration_tokens(weights, scores, job.calibration, job.out_dir))
    rows = prune_at_ratios(weights, selection, job.ratios, options, out_dir=job.out_dir,
                           manifest=manifest, measure=measure,
                           card={"source": job.model, "command": job.command})
    baseline = random_baseline(weights, selection, job.ratios, measure, rows)
    if baseline:
        header["random_baseline"] = baseline
        if manifest is not None:
            manifest.header = header
            manifest.save()
    return PruneResult(header, rows, weights.num_params(), dense.get("ppl"), dense.get("accuracy"),
                       baseline)

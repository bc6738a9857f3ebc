"""One pruning run (launch.prune): load a model, train (or reuse) a policy, prune at several ratios,
write each sliced model as an orbax checkpoint (and optionally an HF folder) into the run folder,
and record it in the manifest (run/run_dir.py).

`prune_at_ratios` is shared with run/batch.py (many models, one policy). Every output folder is
written under a temporary name and renamed when complete, and the manifest is rewritten
atomically after each output, so an interrupted run is resumed by skipping what is done.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
from absl import logging

from prunenet_jax import prune, sources
from prunenet_jax.errors import UserError
from prunenet_jax.evaluation import perplexity
from prunenet_jax.formats import orbax
from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import sampling, trainer
from prunenet_jax.method.train import TrainConfig
from prunenet_jax.models import registry
from prunenet_jax.run import run_dir
from prunenet_jax.run.run_dir import Manifest, OutputEntry
from prunenet_jax.weights import ModelWeights


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """How outputs are made from a policy: the selection and what is written."""
    mode: str = "sample"
    seed: int = 42
    export_hf: bool = False
    torch_format: bool = False
    recover: Optional["RecoverSpec"] = None  # --recover_steps: fine-tune each output before writing

    def recipe(self, params: dict) -> dict:
        """What an output depends on besides the model and ratio (see run_dir.RECIPE_FIELDS)."""
        return run_dir.recipe(policy_lib.fingerprint(params), self.mode, self.seed,
                              self.export_hf, self.torch_format,
                              None if self.recover is None else self.recover.recipe())


@dataclasses.dataclass(frozen=True)
class Training:
    """How a policy is trained (when none is given)."""
    config: TrainConfig
    episodes: int = 20
    checkpoint_every: int = 1


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
    command: str = ""


def check_ratios_fit(intermediate_size: int, ratios, source: str) -> None:
    """Refuses a ratio that keeps no channel of this model."""
    for r in ratios:
        try:
            sampling.num_kept(intermediate_size, r)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None


def ppl_of(weights: ModelWeights, cfg: Optional[perplexity.EvalConfig]) -> Callable:
    """`weights -> ppl` scored with `weights`' tokenizer (None without an eval config)."""
    if cfg is None:
        return lambda w: None
    measure = perplexity.perplexity_fn(sources.load_tokenizer(weights), cfg)
    return lambda w: measure(w)["ppl"]


def prune_at_ratios(weights: ModelWeights, params: dict, ratios, options: OutputOptions, *,
                    out_dir: Optional[str], manifest: Optional[Manifest],
                    ppl: Callable[[ModelWeights], Optional[float]] = lambda w: None,
                    card: Optional[dict] = None, checkpoint: Optional[str] = None,
                    extra: Optional[dict] = None,
                    on_output: Callable[[OutputEntry], None] = lambda e: None) -> list[OutputEntry]:
    """Prunes `weights` at every ratio; with `out_dir`, writes `<out_dir>/ratio_<r>/orbax` (and
    `/hf`) and records each output in `manifest` (as batch item `checkpoint`, with the `extra`
    fields); outputs the manifest already has done by the same recipe are skipped. Returns the
    entries in ratio order."""
    dense_params = weights.num_params()
    made_by = options.recipe(params)
    entries, gate = [], None
    for r in ratios:
        if manifest is not None and manifest.is_done(r, made_by, checkpoint):
            entries.append(manifest.find(r, checkpoint))
            on_output(entries[-1])
            continue
        if gate is None:  # on the device once for all ratios (GBs on a 7B model)
            gate = jax.device_put(weights.layers[registry.GATE])
        kept = prune.select_kept(params, gate, r, options.mode, options.seed)
        pruned = prune.slice_weights(weights, kept)
        k = int(kept.shape[1])
        meta = {**(card or {}), "policy_fingerprint": made_by["policy_fingerprint"],
                "mode": options.mode, "seed": options.seed, "ratio": r, "kept": k,
                "params_before": dense_params, "params_after": pruned.num_params()}
        entry = OutputEntry(ratio=r, kept=k, params=pruned.num_params(), checkpoint=checkpoint,
                            recipe=made_by, extra=dict(extra or {}))
        recovered = None
        if options.recover is not None:
            state_dir = out_dir and os.path.join(out_dir, run_dir.RECOVER_STATE, run_dir.ratio_dirname(r))
            pruned, recovered = options.recover.apply(pruned, weights, ppl=ppl, state_dir=state_dir)
            entry.extra.update(recovered)
        if out_dir is not None:
            orbax_dir, hf_dir = run_dir.output_dirs(out_dir, r, manifest and manifest.folder)
            rel = manifest.relative if manifest else (lambda p: p)
            orbax.save_model(orbax_dir, pruned, meta, kept=kept, overwrite=True)
            entry.orbax_dir = rel(orbax_dir)
            if options.export_hf:
                from prunenet_jax.formats import hf

                hf.export_hf(pruned, hf_dir, model_card=orbax.model_card_fields(meta),
                             torch_format=options.torch_format, overwrite=True)
                entry.hf_dir = rel(hf_dir)
        entry.ppl = ppl(pruned) if recovered is None else recovered[run_dir.RECOVERY]["ppl_after"]
        if manifest is not None:
            manifest.record(entry)
        entries.append(entry)
        on_output(entry)
        del pruned
    return entries


@dataclasses.dataclass
class PruneResult:
    header: dict  # the manifest's run-level fields
    outputs: list  # OutputEntry per ratio
    dense_params: int
    dense_ppl: Optional[float]

    def to_json(self) -> dict:
        return run_dir.manifest_json(self.header, self.outputs)


def run(job: PruneJob, start_devices: Callable[[], Optional[jax.sharding.Mesh]]) -> Optional[PruneResult]:
    """The whole run. Everything cheap is checked before `start_devices()` (jax.distributed and
    the mesh) and before any weights are read. Returns None on processes other than 0 (they only
    train; process 0 prunes, evaluates and writes)."""
    cfg = job.training.config
    policy = orbax.load_policy(job.policy) if job.policy else None
    # The model's config is cheap to read: shape errors surface before the weights are loaded.
    config = sources.load_config(job.model, revision=job.revision)
    check_ratios_fit(config.intermediate_size, list(job.ratios) + [cfg.ratio], job.model)
    if job.eval is not None:
        job.eval.check_model(config, job.model)
    if job.outputs.recover is not None:
        job.outputs.recover.check(config, job.ratios)
    if policy is not None:
        orbax.check_policy_fits(policy[1], config, job.model, job.policy)
    mesh = start_devices()
    logging.info("mesh: %d devices over %d processes", 1 if mesh is None else mesh.size,
                 jax.process_count())
    if policy is not None and jax.process_index() != 0:
        return None  # nothing to train: process 0 prunes, evaluates and writes
    if jax.process_index() == 0:
        weights = sources.load_model(job.model, revision=job.revision)
        config, W = weights.config, weights.layers[registry.GATE]
        if weights.gguf_file is None and policy is None:
            # training reads the gate matrices as stored (bf16 stays bf16 on the device), streamed a
            # layer at a time from the memory-mapped file; a GGUF's are dequantised to fp32 anyway
            _, W = sources.load_gate_stack(job.model, revision=job.revision)
    else:  # other hosts only train: they read just their own layers' gate matrices, lazily
        weights = None
        config, W = sources.load_gate_stack(job.model, revision=job.revision)
    logging.info("loaded %s: %d layers, I=%d, H=%d", job.model, config.num_hidden_layers,
                 config.intermediate_size, config.hidden_size)

    if policy is not None:
        params, training = policy[0], {"policy": os.path.abspath(job.policy)}
    else:
        params, training = trainer.train_policy(
            W, config, cfg, seed=job.outputs.seed, episodes=job.training.episodes, mesh=mesh,
            state_dir=job.out_dir and os.path.join(job.out_dir, run_dir.TRAIN_STATE),
            policy_dir=job.out_dir and os.path.join(job.out_dir, run_dir.POLICY),
            resume=job.resume, source=job.model, checkpoint_every=job.training.checkpoint_every)
        if weights is None:
            return None  # process 0 prunes, evaluates and writes
    ppl = ppl_of(weights, job.eval)
    dense_ppl = ppl(weights)
    header = run_dir.prune_header(
        model=job.model, policy_dir=run_dir.POLICY if policy is None else os.path.abspath(job.policy),
        fingerprint=policy_lib.fingerprint(params), seed=job.outputs.seed, mode=job.outputs.mode,
        train_ratio=cfg.ratio if policy is None else policy[1]["train_config"]["ratio"],
        dense_params=weights.num_params(), dense_ppl=dense_ppl, training=training,
        command=job.command)
    manifest = Manifest(job.out_dir, header, resume=job.resume) if job.out_dir else None
    rows = prune_at_ratios(weights, params, job.ratios, job.outputs, out_dir=job.out_dir,
                           manifest=manifest, ppl=ppl,
                           card={"source": job.model, "command": job.command})
    return PruneResult(header, rows, weights.num_params(), dense_ppl)

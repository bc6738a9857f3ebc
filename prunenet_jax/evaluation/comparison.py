"""A dense model and its pruned versions, measured side by side (launch.evaluate with --pruned,
--report_dir or --lm_eval_tasks): gate spectra and KS per layer, perplexity, lm-eval accuracy,
and the report folder. One model is in memory at a time."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Callable, Optional

from absl import logging

from prunenet_jax import progress, pruned_models, sources
from prunenet_jax.errors import UserError
from prunenet_jax.files import json_files, run_lock
from prunenet_jax.evaluation import lm_eval, measures, plots, report, tables
from prunenet_jax import perplexity


@dataclasses.dataclass
class Pruned:
    name: str  # short label for tables and plots
    source: str  # as the user named it (or the manifest's folder)
    path: str  # local file or folder (a hub id is downloaded by the check before heavy work)
    ratio: Optional[float]  # the manifest's; None: from the config
    hf_dir: Optional[str]  # an HF folder lm-eval can run, when there is one
    mode: Optional[str] = None  # how its channels were selected (the manifest's), for the plot
    recovery: Optional[dict] = None  # the manifest's record of its recovery fine-tune
    pruned_from: Optional[str] = None  # the dense model it was pruned from, as recorded


@dataclasses.dataclass(frozen=True)
class CompareJob:
    """Everything launch.evaluate asks for beyond a plain perplexity run."""
    model: str
    revision: Optional[str] = None
    pruned: Optional[str] = None  # comma list: model folders or prune run folders
    eval: perplexity.EvalConfig = perplexity.EvalConfig(texts={})  # no texts: no perplexity
    report_dir: Optional[str] = None
    overwrite: bool = False
    lm_eval_tasks: str = ""
    lm_eval_limit: int = 0
    lm_eval_batch_size: int = 1
    ratio: Optional[float] = None  # --ratio/--mode: which pruned models of a run folder
    mode: Optional[str] = None

    @property
    def plain(self) -> bool:
        """Perplexity of the model alone (no comparison, report or lm-eval)."""
        return not (self.pruned or self.report_dir or self.lm_eval_tasks)

    def check(self) -> None:
        """Refuses what cannot work, before anything is loaded: the flags, the installs."""
        if not self.eval.name and self.plain:
            raise UserError("--eval_text is required (unless --pruned, --report_dir or "
                            "--lm_eval_tasks is given); pass one or more text files")
        self.eval.check()
        if self.lm_eval_limit < 0:
            raise UserError(f"--lm_eval_limit={self.lm_eval_limit} must be >= 0 (0 means all)")
        if self.lm_eval_batch_size < 1:
            raise UserError(f"--lm_eval_batch_size={self.lm_eval_batch_size} must be at least 1")
        if (self.ratio is not None or self.mode is not None) and not self.pruned:
            raise UserError("--ratio/--mode pick among the pruned models of --pruned; pass "
                            "--pruned=<a prune run's --out_dir>, or drop them")
        if lm_eval.parse_tasks(self.lm_eval_tasks):
            lm_eval.check_installed()
        if self.report_dir:
            plots.check_plotting()


def expand_pruned(spec: Optional[str], ratio: Optional[float] = None,
                  mode: Optional[str] = None) -> list[Pruned]:
    """--pruned entries as models (pruned_models.resolve: a run folder expands to its finished
    outputs, HF export preferred; `ratio`/`mode` narrow them); labels told apart."""
    found = []
    for entry in (e.strip() for e in (spec or "").split(",")):
        if not entry:
            continue
        models = pruned_models.resolve(entry, ratio, mode, "--pruned")
        if models is None:  # not a folder: a hub id (downloaded here), or the error of a bad path
            try:
                kind, path = sources.resolve_source(entry)
            except UserError as e:
                raise UserError(f"--pruned: {e}") from None
            models = [pruned_models.PrunedModel(os.path.basename(os.path.normpath(entry)), ".",
                                                path if kind == "orbax" else None,
                                                path if kind != "orbax" else None, None)]
        found += models
    return [Pruned(m.label, m.folder(), m.folder(), m.ratio,
                   m.hf_dir if lm_eval.is_hf_folder(m.hf_dir) else None, m.mode_label, m.recovery,
                   m.source)
            for m in pruned_models.unique_labels(found)]


def _identity(source: str) -> str:
    """What a model name points at, for telling whether two names are one model: a local file
    or folder's real path (`default`, `gemma3-270m`: the packaged GGUF's), else the name (a hub
    id)."""
    path = sources.resolve_source(source)[1] if source in sources.PACKAGED_MODELS else source
    return os.path.realpath(path) if os.path.exists(path) else source


def warn_other_source(model: str, pruned: list[Pruned]) -> list[str]:
    """One warning line per recorded dense source that is not `model` (--model, compared as
    resolved: the same file or folder, or the same hub id); none when a pruned model records no
    source."""
    want = _identity(model)
    lines = []
    for source in dict.fromkeys(p.pruned_from for p in pruned if p.pruned_from):
        if source != model and _identity(source) != want:
            names = ", ".join(p.name for p in pruned if p.pruned_from == source)
            lines.append(f"warning: {names}: pruned from {source}, not from --model={model}; "
                         "its KS and perplexity are measured against --model all the same")
    for line in lines:
        progress.message(line)
    return lines


def _check_compatible(weights, dense_cfg, name: str) -> None:
    cfg = weights.config
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(cfg, field) != getattr(dense_cfg, field):
            raise UserError(f"pruned model {name} has {field}={getattr(cfg, field)} but --model "
                            f"has {getattr(dense_cfg, field)}; pass models pruned from --model")
    if cfg.intermediate_size > dense_cfg.intermediate_size:
        raise UserError(f"pruned model {name} has intermediate_size={cfg.intermediate_size}, "
                        f"more than --model's {dense_cfg.intermediate_size}; is --model its "
                        "dense source?")


def _ratio(p: Pruned, weights, dense_cfg, model: str) -> float:
    """The ratio `p` is labelled with: from its weights against --model's width (the recorded one
    checked against them) when --model is its dense source; as recorded when it names another."""
    if p.ratio is not None and p.pruned_from and _identity(p.pruned_from) != _identity(model):
        return p.ratio  # another dense model's width: nothing to check against (warned above)
    return pruned_models.weights_ratio(p.ratio, weights.config.intermediate_size,
                                       dense_cfg.intermediate_size, p.path)


def measure(model: str, dense_path: str, pruned: list[Pruned],
            eval_cfg: Optional[perplexity.EvalConfig],
            continue_prompt: bool = False) -> tuple[list[dict], list, Optional[dict]]:
    """Report rows (dense first), gate spectra at the plotted layers, and the dense model's full
    perplexity result (per text, for the plain run's table). The dense model's tokenizer scores
    every model (pruning keeps the vocabulary). With `continue_prompt`, each row gets the model's
    greedy continuation of measures.PROMPT."""
    dense = sources.load_model(dense_path)
    dense_cfg = dense.config
    logging.info("loaded %s: %d layers, %.1fM parameters", model, dense_cfg.num_hidden_layers,
                 dense.num_params() / 1e6)
    ppl: Callable = (perplexity.perplexity_fn(sources.load_tokenizer(dense), eval_cfg)
                     if eval_cfg else lambda w: None)
    layers = measures.plotted_layers(dense_cfg.num_hidden_layers)
    dense_sv = measures.gate_spectra(dense)
    dense_ppl = ppl(dense)
    tokenizer = None
    if continue_prompt:
        try:
            tokenizer = sources.load_tokenizer(dense)
        except UserError as e:  # a model without tokenizer files can still be compared
            logging.warning("no greedy continuations in the report: %s", e)
    continuation = lambda w: measures.continuation(w, tokenizer) if tokenizer is not None else None
    models = [measures.model_record("dense", model, dense, 0.0, measures.gate_ks(dense_sv, dense_sv),
                                  dense_ppl, continuation=continuation(dense))]
    spectra = [dense_sv[layers]]
    del dense
    for p in pruned:
        weights = sources.load_model(p.path)
        _check_compatible(weights, dense_cfg, p.source)
        sv = measures.gate_spectra(weights)
        ratio = _ratio(p, weights, dense_cfg, model)
        models.append(measures.model_record(p.name, p.source, weights, ratio,
                                          measures.gate_ks(dense_sv, sv), ppl(weights),
                                          mode=p.mode, continuation=continuation(weights),
                                          recovery=p.recovery))
        spectra.append(sv[layers])
        logging.info("%s: ratio %.3f, mean KS %.4f, ppl %s", p.name, ratio, models[-1]["mean_ks"],
                     "-" if models[-1]["ppl"] is None else f"{models[-1]['ppl']:.3f}")
        del weights
    return measures.add_retention(models), spectra, dense_ppl


def perplexity_table(result: dict) -> str:
    """A perplexity result (perplexity.perplexity's) as a table: one row per text, then all."""
    width = max(len("text"), *(len(n) for n in result["files"]))
    return "\n".join([f"{'text':<{width}}  {'tokens':>8}  {'ppl':>10}"]
                     + [f"{name:<{width}}  {r['tokens']:>8}  {r['ppl']:>10.4f}"
                        for name, r in result["files"].items()]
                     + [f"{'all':<{width}}  {result['tokens']:>8}  {result['ppl']:>10.4f}"])


def evaluate(job: CompareJob) -> tuple[str, dict]:
    """launch.evaluate's whole job: (the tables it prints, its JSON line). The plain run gives
    the perplexity table; a comparison the dense model's (with an eval text), then its own."""
    if job.plain:
        result = dense_perplexity(job)
        return perplexity_table(result), result
    summary, dense_ppl = run(job)
    table = tables.format_table(summary["models"], summary)
    return (f"{perplexity_table(dense_ppl)}\n\n{table}" if dense_ppl else table,
            json_files.finite(summary))


def dense_perplexity(job: CompareJob) -> dict:
    """The plain run: perplexity of `job.model` alone (perplexity.perplexity's result)."""
    job.check()
    weights = sources.load_model(job.model, revision=job.revision)
    logging.info("loaded %s: %d layers, %.1fM parameters", weights.source,
                 weights.config.num_hidden_layers, weights.num_params() / 1e6)
    return perplexity.perplexity_fn(sources.load_tokenizer(weights), job.eval)(weights)


def run(job: CompareJob) -> tuple[dict, Optional[dict]]:
    """(the summary: report.json's content, the dense model's perplexity result or None); the
    --report_dir's lock is held throughout (one writer at a time)."""
    job.check()
    with contextlib.ExitStack() as lock:
        return _run(job, lock)


def _run(job: CompareJob, lock: contextlib.ExitStack) -> tuple[dict, Optional[dict]]:
    kind, dense_path = sources.resolve_source(job.model, job.revision)
    dense_hf = dense_path if kind == "hf" and lm_eval.is_hf_folder(dense_path) else None
    pruned = expand_pruned(job.pruned, job.ratio, job.mode)
    warn_other_source(job.model, pruned)
    if job.report_dir:
        inputs = [dense_path] + [p.source for p in pruned] + [
            e.strip() for e in (job.pruned or "").split(",") if e.strip()]
        report.check_report_dir(job.report_dir, inputs, job.overwrite)
        # after the check (the lock is a file beside --report_dir: never one inside an input)
        lock.enter_context(run_lock.hold_beside(job.report_dir, flag="--report_dir"))
        report.check_report_dir(job.report_dir, inputs, job.overwrite)
    tasks = lm_eval.prepare(job.lm_eval_tasks)
    if tasks is not None and tasks.message():
        print(f"warning: {tasks.message()}", file=sys.stderr, flush=True)

    models, spectra, dense_ppl = measure(job.model, dense_path, pruned,
                                          job.eval if job.eval.texts else None,
                                          continue_prompt=bool(job.report_dir))

    if tasks is not None:
        for m, hf_dir in zip(models, [dense_hf] + [p.hf_dir for p in pruned]):
            m["lm_eval"] = (lm_eval.evaluate(tasks, hf_dir, job.lm_eval_limit, job.lm_eval_batch_size)
                            if hf_dir else lm_eval.not_hf(m["source"]))

    summary = dict(dense_ppl or {})  # the dense model's ppl, tokens, files: as a plain run prints
    summary.update({
        "model": job.model, "eval_text": job.eval.name or None,
        "max_tokens": job.eval.max_tokens, "seq_len": job.eval.seq_len,
        "eval": job.eval.setting() if job.eval.texts else None,
        "spectra_layers": measures.plotted_layers(len(models[0]["ks"])),
        "lm_eval": None if tasks is None else {
            "tasks": tasks.names,
            "metrics": lm_eval.metrics(tasks, [m["lm_eval"] for m in models]),
            "limit": job.lm_eval_limit, "unavailable": tasks.unavailable},
        "models": models})
    if job.report_dir:
        summary = report.write_report(job.report_dir, summary, spectra, job.overwrite)
        summary["report_dir"] = os.path.abspath(job.report_dir)
        logging.info("report written to %s", summary["report_dir"])
    return summary, dense_ppl

"""A dense model and its pruned versions, measured side by side (launch.evaluate with --pruned,
--report_dir or --lm_eval_tasks): gate spectra and KS per layer, perplexity, lm-eval accuracy,
and the report folder. One model is in memory at a time."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Optional

from absl import logging

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from prunenet_jax.evaluation import lm_eval, measures, plots, report, tables
from prunenet_jax import perplexity
from prunenet_jax.formats import run_dir


@dataclasses.dataclass
class Pruned:
    name: str  # short label for tables and plots
    source: str  # as the user named it (or the manifest's folder)
    path: str  # local file or folder (a hub id is downloaded by the check before heavy work)
    ratio: Optional[float]  # the manifest's; None: from the config
    hf_dir: Optional[str]  # an HF folder lm-eval can run, when there is one
    mode: Optional[str] = None  # how its channels were selected (the manifest's), for the plot
    recovery: Optional[dict] = None  # the manifest's record of its recovery fine-tune


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
        if lm_eval.parse_tasks(self.lm_eval_tasks):
            lm_eval.check_installed()
        if self.report_dir:
            plots.check_plotting()


def _short_name(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    # A prune run's outputs are <run>/ratio_<r>/{hf,orbax}: the folder name alone says little.
    return "/".join(parts[-2:]) if parts[-1] in (run_dir.HF, run_dir.ORBAX) and len(parts) > 1 else parts[-1]


def _from_run_dir(folder: str) -> list[Pruned]:
    found = []
    for o in run_dir.finished_outputs(folder):
        rel = os.path.relpath(o.model_dir, folder)
        name = f"{os.path.basename(os.path.normpath(folder))}/{os.path.dirname(os.path.normpath(rel)) or rel}"
        found.append(Pruned(name, o.model_dir, o.model_dir, o.ratio,
                            o.hf_dir if lm_eval.is_hf_folder(o.hf_dir) else None, o.mode,
                            o.recovery))
    return found


def expand_pruned(spec: Optional[str]) -> list[Pruned]:
    """--pruned entries as models: a run folder (with a manifest) expands to its finished outputs."""
    found = []
    for entry in (e.strip() for e in (spec or "").split(",")):
        if not entry:
            continue
        if run_dir.is_run_dir(entry):
            found += _from_run_dir(entry)
            continue
        try:
            kind, path = sources.resolve_source(entry)
        except UserError as e:
            raise UserError(f"--pruned: {e}") from None
        hf_dir = path if kind == "hf" and lm_eval.is_hf_folder(path) else None
        found.append(Pruned(_short_name(entry), entry, path, None, hf_dir))
    names = set()
    for p in found:  # labels must tell models apart
        base, n = p.name, 2
        while p.name in names or p.name == "dense":
            p.name, n = f"{base}#{n}", n + 1
        names.add(p.name)
    return found


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
        ratio = p.ratio if p.ratio is not None else measures.ratio_of(weights, dense_cfg.intermediate_size)
        models.append(measures.model_record(p.name, p.source, weights, ratio,
                                          measures.gate_ks(dense_sv, sv), ppl(weights),
                                          mode=p.mode, continuation=continuation(weights),
                                          recovery=p.recovery))
        spectra.append(sv[layers])
        logging.info("%s: ratio %.3f, mean KS %.4f, ppl %s", p.name, ratio, models[-1]["mean_ks"],
                     models[-1]["ppl"])
        del weights
    return models, spectra, dense_ppl


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
            report.json_safe(summary))


def dense_perplexity(job: CompareJob) -> dict:
    """The plain run: perplexity of `job.model` alone (perplexity.perplexity's result)."""
    job.check()
    weights = sources.load_model(job.model, revision=job.revision)
    logging.info("loaded %s: %d layers, %.1fM parameters", weights.source,
                 weights.config.num_hidden_layers, weights.num_params() / 1e6)
    return perplexity.perplexity_fn(sources.load_tokenizer(weights), job.eval)(weights)


def run(job: CompareJob) -> tuple[dict, Optional[dict]]:
    """(the summary: report.json's content, the dense model's perplexity result or None)."""
    job.check()
    kind, dense_path = sources.resolve_source(job.model, job.revision)
    dense_hf = dense_path if kind == "hf" and lm_eval.is_hf_folder(dense_path) else None
    pruned = expand_pruned(job.pruned)
    if job.report_dir:
        inputs = [dense_path] + [p.source for p in pruned] + [
            e.strip() for e in (job.pruned or "").split(",") if e.strip()]
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

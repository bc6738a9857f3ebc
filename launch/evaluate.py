"""Perplexity of a model on text files, in JAX; with pruned models beside it, a comparison of
gate spectra (KS per layer), perplexity and zero-shot accuracy (lm-eval), optionally as a report.

  python -m launch.evaluate --model=default \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384

  python -m launch.evaluate --model=default --pruned=runs/default --report_dir=runs/report \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=4096 \
      --lm_eval_tasks=paper
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from absl import flags, logging

from prunenet_jax.evaluation import perplexity as evaluate
from prunenet_jax import sources as hf_io
from prunenet_jax.evaluation import lm_eval as lm_eval_runner
from prunenet_jax.run import prune_run as pipeline
from prunenet_jax.evaluation import report
from prunenet_jax.evaluation import texts
from prunenet_jax.launch import common
from prunenet_jax.models import llama

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "'default' (SmolLM2-135M-Instruct GGUF), an HF folder, a hub id "
                    "or a .gguf file")
flags.DEFINE_string("revision", None, "Hub revision (branch, tag or commit) when --model is a hub id")
flags.DEFINE_string("eval_text", None, "Comma-separated text files (.gz allowed); a glob is one text "
                    "made of its matches in sorted name order")
flags.DEFINE_integer("max_tokens", 0, "Tokens per text to score (0: all)")
flags.DEFINE_integer("seq_len", 512, "Window length; windows do not overlap")
flags.DEFINE_integer("batch_size", 4, "Windows per forward pass")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16")
flags.DEFINE_string("pruned", None, "Comma-separated pruned versions of --model to compare with it: "
                    "model folders, or a prune run's --out_dir (its manifest.json's finished outputs)")
flags.DEFINE_string("report_dir", None, "Write report.json, report.md and PNG plots (spectra, KS per "
                    "layer, perplexity against ratio) to this new folder")
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --report_dir")
flags.DEFINE_string("lm_eval_tasks", "", "Comma-separated lm-eval tasks for zero-shot accuracy of "
                    "each HF-folder model ('paper': piqa,winogrande,hellaswag,arc_easy,arc_challenge); "
                    "needs `pip install lm-eval` and the datasets (HF hub or local cache)")
flags.DEFINE_integer("lm_eval_limit", 0, "Examples per lm-eval task (0: all)")
flags.DEFINE_integer("lm_eval_batch_size", 1, "lm-eval batch size")


def print_table(result: dict) -> None:
    width = max(len("text"), *(len(n) for n in result["files"]))
    print(f"{'text':<{width}}  {'tokens':>8}  {'ppl':>10}")
    for name, r in result["files"].items():
        print(f"{name:<{width}}  {r['tokens']:>8}  {r['ppl']:>10.4f}")
    print(f"{'all':<{width}}  {result['tokens']:>8}  {result['ppl']:>10.4f}")


@dataclasses.dataclass
class Pruned:
    name: str  # short label for tables and plots
    source: str  # as the user named it (or the manifest's folder)
    path: str  # local file or folder (a hub id is downloaded by the check before heavy work)
    ratio: Optional[float]  # the manifest's; None: from the config
    hf_dir: Optional[str]  # an HF folder lm-eval can run, when there is one


def _short_name(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    # A prune run's outputs are <run>/ratio_<r>/{hf,orbax}: the folder name alone says little.
    return "/".join(parts[-2:]) if parts[-1] in ("hf", "orbax") and len(parts) > 1 else parts[-1]


def _from_manifest(folder: str) -> list[Pruned]:
    path = os.path.join(folder, pipeline.MANIFEST)
    manifest = pipeline.read_manifest(path)
    if manifest is None:
        raise common.UserError(f"{path} is not a readable prune manifest; pass the --out_dir of a "
                               "finished launch.prune run")
    done = [o for o in manifest["outputs"] if isinstance(o, dict) and o.get("status") == "done"]
    if not done:
        raise common.UserError(f"{path} lists no finished output (status 'done'); finish or resume "
                               "the prune run, or pass model folders")
    found = []
    for o in done:
        rel = o.get("hf_dir") or o.get("orbax_dir")  # lm-eval and transformers need the HF export
        model = os.path.join(folder, rel) if rel else None
        if model is None or not os.path.isdir(model):
            raise common.UserError(f"{path}: the output at ratio {o.get('ratio')} names folder "
                                   f"{rel!r}, which is missing; rerun the prune launcher with --resume")
        hf_dir = os.path.join(folder, o["hf_dir"]) if o.get("hf_dir") else None
        name = f"{os.path.basename(os.path.normpath(folder))}/{os.path.dirname(os.path.normpath(rel)) or rel}"
        found.append(Pruned(name, model, model, float(o["ratio"]) if o.get("ratio") is not None else None,
                            hf_dir if lm_eval_runner.is_hf_folder(hf_dir) else None))
    return found


def expand_pruned(spec: Optional[str]) -> list[Pruned]:
    """--pruned entries as models: a folder with manifest.json expands to its finished outputs."""
    found = []
    for entry in (e.strip() for e in (spec or "").split(",")):
        if not entry:
            continue
        if os.path.isfile(os.path.join(entry, pipeline.MANIFEST)):
            found += _from_manifest(entry)
            continue
        try:
            kind, path = hf_io.resolve_source(entry)
        except common.UserError as e:
            raise common.UserError(f"--pruned: {e}") from None
        hf_dir = path if kind == "hf" and lm_eval_runner.is_hf_folder(path) else None
        found.append(Pruned(_short_name(entry), entry, path, None, hf_dir))
    names = set()
    for p in found:  # labels must tell models apart
        base, n = p.name, 2
        while p.name in names or p.name == "dense":
            p.name, n = f"{base}#{n}", n + 1
        names.add(p.name)
    return found


def _check_flags() -> None:
    checks = [(FLAGS.max_tokens < 0, f"--max_tokens={FLAGS.max_tokens} must be >= 0 (0 means all)"),
              (FLAGS.seq_len < 2, f"--seq_len={FLAGS.seq_len} is too short; use at least 2 (512 is typical)"),
              (FLAGS.batch_size < 1, f"--batch_size={FLAGS.batch_size} must be at least 1"),
              (FLAGS.lm_eval_limit < 0, f"--lm_eval_limit={FLAGS.lm_eval_limit} must be >= 0 (0 means all)"),
              (FLAGS.lm_eval_batch_size < 1, f"--lm_eval_batch_size={FLAGS.lm_eval_batch_size} must be at least 1")]
    for bad, message in checks:
        if bad:
            raise common.UserError(message)


def _check_compatible(weights, dense_cfg, name: str) -> None:
    cfg = weights.config
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(cfg, field) != getattr(dense_cfg, field):
            raise common.UserError(f"pruned model {name} has {field}={getattr(cfg, field)} but --model "
                                   f"has {getattr(dense_cfg, field)}; pass models pruned from --model")
    if cfg.intermediate_size > dense_cfg.intermediate_size:
        raise common.UserError(f"pruned model {name} has intermediate_size={cfg.intermediate_size}, "
                               f"more than --model's {dense_cfg.intermediate_size}; is --model its "
                               "dense source?")


def measure(dense_path: str, pruned: list[Pruned], perplexity) -> tuple[list[dict], list, Optional[dict]]:
    """Report rows (dense first), gate spectra at the plotted layers, and the dense model's full
    perplexity result (per text, for the plain run's table). One model is in memory
    at a time; the dense model's tokenizer scores every model (pruning keeps the vocabulary).
    `perplexity(weights, tokenizer)`, or None to skip perplexity."""
    dense = hf_io.load_model(dense_path)
    dense_cfg = dense.config
    logging.info("loaded %s: %d layers, %.1fM parameters", FLAGS.model, dense_cfg.num_hidden_layers,
                 dense.num_params() / 1e6)
    tokenizer = hf_io.load_tokenizer(dense) if perplexity else None
    layers = report.plotted_layers(dense_cfg.num_hidden_layers)
    dense_sv = report.gate_spectra(dense)
    dense_ppl = perplexity(dense, tokenizer) if perplexity else None
    models = [report.model_record("dense", FLAGS.model, dense, 0.0,
                                  report.layer_ks(dense_sv, dense_sv), dense_ppl)]
    spectra = [dense_sv[layers]]
    del dense
    for p in pruned:
        weights = hf_io.load_model(p.path)
        _check_compatible(weights, dense_cfg, p.source)
        sv = report.gate_spectra(weights)
        ratio = p.ratio if p.ratio is not None else report.ratio_of(weights, dense_cfg.intermediate_size)
        models.append(report.model_record(p.name, p.source, weights, ratio,
                                          report.layer_ks(dense_sv, sv),
                                          perplexity(weights, tokenizer) if perplexity else None))
        spectra.append(sv[layers])
        logging.info("%s: ratio %.3f, mean KS %.4f, ppl %s", p.name, ratio, models[-1]["mean_ks"],
                     models[-1]["ppl"])
        del weights
    return models, spectra, dense_ppl


def main(argv) -> None:
    # Every cheap check first: flags, installs, texts, model paths, the report folder, datasets.
    extended = bool(FLAGS.pruned or FLAGS.report_dir or FLAGS.lm_eval_tasks)
    if not FLAGS.eval_text and not extended:
        raise common.UserError("--eval_text is required (unless --pruned, --report_dir or "
                               "--lm_eval_tasks is given); pass one or more text files")
    _check_flags()
    dtype = common.dtype(FLAGS.dtype)
    if lm_eval_runner.parse_tasks(FLAGS.lm_eval_tasks):
        lm_eval_runner.check_installed()
    if FLAGS.report_dir:
        report.check_plotting()
    eval_texts = texts.read_texts(FLAGS.eval_text) if FLAGS.eval_text else None

    def perplexity(weights, tokenizer):
        model = llama.from_named_arrays(weights.config, weights.named_arrays(), dtype=dtype)
        return evaluate.perplexity(model, tokenizer, eval_texts, seq_len=FLAGS.seq_len,
                                   batch_size=FLAGS.batch_size, max_tokens=FLAGS.max_tokens or None)

    if not extended:  # the plain perplexity run
        weights = hf_io.load_model(FLAGS.model, revision=FLAGS.revision)
        logging.info("loaded %s: %d layers, %.1fM parameters", weights.source,
                     weights.config.num_hidden_layers, weights.num_params() / 1e6)
        result = perplexity(weights, hf_io.load_tokenizer(weights))
        print_table(result)
        print(json.dumps(result))
        return

    kind, dense_path = hf_io.resolve_source(FLAGS.model, FLAGS.revision)
    dense_hf = dense_path if kind == "hf" and lm_eval_runner.is_hf_folder(dense_path) else None
    pruned = expand_pruned(FLAGS.pruned)
    if FLAGS.report_dir:
        inputs = [dense_path] + [p.source for p in pruned] + [
            e.strip() for e in (FLAGS.pruned or "").split(",") if e.strip()]
        report.check_report_dir(FLAGS.report_dir, inputs, FLAGS.overwrite)
    tasks = lm_eval_runner.prepare(FLAGS.lm_eval_tasks)
    if tasks is not None and tasks.message():
        print(f"warning: {tasks.message()}", file=sys.stderr, flush=True)

    models, spectra, dense_ppl = measure(dense_path, pruned, perplexity if eval_texts else None)

    if tasks is not None:
        for m, hf_dir in zip(models, [dense_hf] + [p.hf_dir for p in pruned]):
            m["lm_eval"] = (lm_eval_runner.evaluate(tasks, hf_dir, FLAGS.lm_eval_limit,
                                                    FLAGS.lm_eval_batch_size)
                            if hf_dir else lm_eval_runner.not_hf(m["source"]))

    summary = dict(dense_ppl or {})  # the dense model's ppl, tokens, files: as a plain run prints
    summary.update({
        "model": FLAGS.model, "eval_text": FLAGS.eval_text, "max_tokens": FLAGS.max_tokens,
        "seq_len": FLAGS.seq_len, "spectra_layers": report.plotted_layers(len(models[0]["ks"])),
        "lm_eval": None if tasks is None else {
            "tasks": tasks.names,
            "metrics": lm_eval_runner.metrics(tasks, [m["lm_eval"] for m in models]),
            "limit": FLAGS.lm_eval_limit, "unavailable": tasks.unavailable},
        "models": models})
    if FLAGS.report_dir:
        summary = report.write_report(FLAGS.report_dir, summary, spectra, FLAGS.overwrite)
        summary["report_dir"] = os.path.abspath(FLAGS.report_dir)
        logging.info("report written to %s", summary["report_dir"])
    if dense_ppl:
        print_table(dense_ppl)
        print()
    print(report.format_table(models))
    print(json.dumps(report.json_safe(summary)))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

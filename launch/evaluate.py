"""Perplexity of a model on text files, in JAX; with pruned models beside it, a comparison of
gate spectra (KS per layer), perplexity and zero-shot accuracy (lm-eval), optionally as a report.

  python -m launch.evaluate --model=default \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384

  python -m launch.evaluate --model=default --pruned=runs/default --report_dir=runs/report \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=4096 \
      --lm_eval_tasks=paper
"""
from __future__ import annotations

import json

from absl import flags

from prunenet_jax.evaluation import comparison, lm_eval, report
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags

FLAGS = flags.FLAGS
launch_flags.define_model_flags()
launch_flags.define_eval_flags()
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


def compare_job() -> comparison.CompareJob:
    """The job the flags ask for; every cheap check first (flags, installs, texts)."""
    if not FLAGS.eval_text and not (FLAGS.pruned or FLAGS.report_dir or FLAGS.lm_eval_tasks):
        raise common.UserError("--eval_text is required (unless --pruned, --report_dir or "
                               "--lm_eval_tasks is given); pass one or more text files")
    settings = launch_flags.eval_settings(FLAGS.dtype)
    if FLAGS.lm_eval_limit < 0:
        raise common.UserError(f"--lm_eval_limit={FLAGS.lm_eval_limit} must be >= 0 (0 means all)")
    if FLAGS.lm_eval_batch_size < 1:
        raise common.UserError(f"--lm_eval_batch_size={FLAGS.lm_eval_batch_size} must be at least 1")
    if lm_eval.parse_tasks(FLAGS.lm_eval_tasks):
        lm_eval.check_installed()
    if FLAGS.report_dir:
        report.check_plotting()
    return comparison.CompareJob(
        model=FLAGS.model, revision=FLAGS.revision, pruned=FLAGS.pruned,
        eval=launch_flags.with_texts(settings), report_dir=FLAGS.report_dir,
        overwrite=FLAGS.overwrite, lm_eval_tasks=FLAGS.lm_eval_tasks,
        lm_eval_limit=FLAGS.lm_eval_limit, lm_eval_batch_size=FLAGS.lm_eval_batch_size)


def main(argv) -> None:
    job = compare_job()
    if not (job.pruned or job.report_dir or job.lm_eval_tasks):  # the plain perplexity run
        result = comparison.dense_perplexity(job)
        print_table(result)
        print(json.dumps(result))
        return
    summary, dense_ppl = comparison.run(job)
    if dense_ppl:
        print_table(dense_ppl)
        print()
    print(report.format_table(summary["models"], summary))
    print(json.dumps(report.json_safe(summary)))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

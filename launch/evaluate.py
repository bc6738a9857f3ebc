r"""Perplexity of a model on text files, in JAX; with pruned models beside it, a comparison of
gate spectra (KS per layer), perplexity and zero-shot accuracy (lm-eval), optionally as a report.

  python -m launch.evaluate --model=default \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=16384

  python -m launch.evaluate --model=default --pruned=runs/default --report_dir=runs/report \
      --eval_text='/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt' --max_tokens=4096 \
      --lm_eval_tasks=paper
"""
from __future__ import annotations

from absl import flags

from prunenet_jax.evaluation import comparison
from prunenet_jax.files import json_files
from prunenet_jax.launch import common
from prunenet_jax.launch import flags as launch_flags

FLAGS = flags.FLAGS
launch_flags.define_model_flags()
launch_flags.define_eval_flags()
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16")
flags.DEFINE_string("pruned", None, "Comma-separated pruned versions of --model to compare with it: "
                    "a prune run's --out_dir (its finished outputs, narrowed by --ratio/--mode), "
                    "its [<mode>/]ratio_<r>, or model folders (orbax or HF)")
launch_flags.define_pick_flags()
flags.DEFINE_string("report_dir", None, "Write report.json, report.md and PNG plots (spectra, KS per "
                    "layer, perplexity against ratio) to this new folder")
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --report_dir")
flags.DEFINE_string("lm_eval_tasks", "", "Comma-separated lm-eval tasks for zero-shot accuracy of "
                    "each HF-folder model ('paper': piqa,winogrande,hellaswag,arc_easy,arc_challenge); "
                    "needs `pip install lm-eval` and the datasets (HF hub or local cache)")
flags.DEFINE_integer("lm_eval_limit", 0, "Examples per lm-eval task (0: all)")
flags.DEFINE_integer("lm_eval_batch_size", 1, "lm-eval batch size")
launch_flags.put_in_group(launch_flags.PERPLEXITY, "dtype")
launch_flags.put_in_group("comparison and report", "pruned", "report_dir", "overwrite",
                          "lm_eval_tasks", "lm_eval_limit", "lm_eval_batch_size")


def compare_job() -> comparison.CompareJob:
    """The job the flags ask for (checked by the library, before anything is loaded)."""
    return comparison.CompareJob(
        model=FLAGS.model, revision=FLAGS.revision, pruned=FLAGS.pruned,
        eval=launch_flags.with_texts(launch_flags.eval_settings(FLAGS.dtype)),
        report_dir=FLAGS.report_dir, overwrite=FLAGS.overwrite, lm_eval_tasks=FLAGS.lm_eval_tasks,
        lm_eval_limit=FLAGS.lm_eval_limit, lm_eval_batch_size=FLAGS.lm_eval_batch_size,
        ratio=FLAGS.ratio, mode=FLAGS.mode)


def main(argv) -> None:
    text, result = comparison.evaluate(compare_job())
    print(text)
    print(json_files.dumps(result))


def run():
    common.run(main)


if __name__ == "__main__":
    run()

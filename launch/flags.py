"""Every flag group, defined once, and what turns parsed flags into the library's config
dataclasses. A launcher calls the `define_*` functions of the groups it takes (absl flags are
global, and one launcher runs per process), then builds its job from FLAGS here; the library
itself never reads FLAGS. Each group has a heading in the launcher's --help (`group`), and every
flag of the launcher is one of its absl key flags (`declare_key_flags`, from launch.common.run)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import textwrap
from typing import Optional

from absl import flags

from prunenet_jax import progress, prune, weights
from prunenet_jax.errors import UserError
from prunenet_jax.formats import gguf_export, texts
from prunenet_jax.perplexity import EvalConfig
from prunenet_jax.method import calibration, episode
from prunenet_jax.formats import run_dir
from prunenet_jax.run.prune_run import OutputOptions, Training, train_ratio

FLAGS = flags.FLAGS

# ----------------------------------------------------------------------------- --help

_GROUPS: dict[str, list[str]] = {}  # --help heading -> the flags defined under it, in order
# The headings the launchers share, in --help's order (a launcher's own flags join them with
# `put_in_group`; a heading of its own comes after these).
MODEL, PRUNING, OUTPUTS = "model", "pruning", "outputs"
TRAINING, ENERGY = "policy training (--mode=sample, topk)", "energy scores (--mode=energy, compensated)"
PERPLEXITY, RECOVERY, DEVICES = "perplexity (with --eval_text)", "recovery fine-tuning", "devices"
_ORDER = (MODEL, PRUNING, OUTPUTS, TRAINING, ENERGY, PERPLEXITY, RECOVERY, DEVICES)


@contextlib.contextmanager
def group(title: str):
    """The flags defined inside (a `with` block, or a decorated define_* function) are listed
    under `title` in the launcher's --help; a flag already in an inner group stays there."""
    before = set(FLAGS)
    names = _GROUPS.setdefault(title, [])
    yield
    grouped = {n for names in _GROUPS.values() for n in names}
    names.extend(n for n in FLAGS if n not in before and n not in grouped and FLAGS[n].name == n)


def put_in_group(title: str, *names: str) -> None:
    """Lists flags already defined (a launcher's own) under `title` in --help."""
    for listed in _GROUPS.values():
        listed[:] = [n for n in listed if n not in names]
    _GROUPS.setdefault(title, []).extend(names)


def launcher_flags(module: str) -> dict[str, list[str]]:
    """{heading: flag names, in the order defined} of the launcher `module` (its __name__): the
    groups, then what it or this module defined outside any group."""
    titles = sorted(_GROUPS, key=lambda t: _ORDER.index(t) if t in _ORDER else len(_ORDER))
    order = {n: i for i, n in enumerate(FLAGS)}
    sections = {title: sorted((n for n in _GROUPS[title] if n in FLAGS), key=order.get)
                for title in titles}
    grouped = {n for names in sections.values() for n in names}
    rest = [f.name for m in (module, __name__) for f in FLAGS.get_flags_for_module(m)]
    sections["other"] = [n for n in dict.fromkeys(rest) if n not in grouped]
    return {title: names for title, names in sections.items() if names}


def declare_key_flags(module: str) -> None:
    """Makes every flag of the launcher `module` one of its absl key flags (what absl's own help
    of the main module lists), defined here or there."""
    main = sys.argv[0] if module == "__main__" else module
    for names in launcher_flags(module).values():
        for name in names:
            FLAGS.register_key_flag_for_module(main, FLAGS[name])


def _default(flag) -> Optional[str]:
    if flag.default is None:
        return None
    if isinstance(flag.default, bool):
        return "on" if flag.default else "off"
    return repr(flag.default) if isinstance(flag.default, str) else str(flag.default)


def help_text(module: str, doc: Optional[str]) -> str:
    """The launcher's --help: its docstring, then its flags by group, each with its default."""
    lines = [(doc or f"python -m {module}").strip("\n"), "",
             "flags (--name=value; --name / --noname for an on/off flag):"]
    for title, names in launcher_flags(module).items():
        lines += ["", f"{title}:"]
        for name in names:
            flag = FLAGS[name]
            lines.append(textwrap.fill(f"--{name}: {flag.help or ''}", width=100,
                                       initial_indent="  ", subsequent_indent="      ",
                                       break_on_hyphens=False, break_long_words=False))
            if _default(flag) is not None:
                lines.append(f"      (default: {_default(flag)})")
    lines += ["", "The flags of absl's logging and of JAX: --helpfull."]
    return "\n".join(lines)


@group(MODEL)
def define_model_flags(what: str = "model") -> None:
    flags.DEFINE_string(what, "default", "'default' (SmolLM2-135M-Instruct GGUF), 'gemma3-270m' "
                        "(Gemma 3 270M GGUF, from its PyPI packages), an HF folder, a hub id or a "
                        ".gguf file")
    flags.DEFINE_string("revision", None, f"Hub revision (branch, tag or commit) when --{what} is "
                        "a hub id")


@group(MODEL)
def define_pick_flags() -> None:
    """--ratio/--mode: which pruned model(s) of a run folder (launch.generate, convert, evaluate,
    recover; pruned_models.resolve)."""
    flags.DEFINE_float("ratio", None, "With a folder holding several pruned models (a prune run's "
                       "--out_dir): the one(s) pruned at this ratio")
    flags.DEFINE_enum("mode", None, list(prune.MODES), "With a folder holding several pruned "
                      "models: the one(s) of this mode")


@group(PERPLEXITY)
def define_eval_flags() -> None:
    flags.DEFINE_string("eval_text", None, "Text files for perplexity (comma-separated, .gz "
                        "allowed); a glob is one text made of its matches in sorted name order")
    flags.DEFINE_integer("max_tokens", 0, "Tokens per text to score (0: all)")
    flags.DEFINE_integer("seq_len", 512, "Perplexity window length; windows do not overlap")
    flags.DEFINE_integer("batch_size", 4, "Perplexity windows per forward pass")


@group(PRUNING)
def define_pruning_flags() -> None:
    """Ratios, policy training, selection and outputs (launch.prune, launch.batch_prune)."""
    flags.DEFINE_string("ratios", "0.1,0.2,0.3", "Comma-separated compression ratios in [0, 1)")
    flags.DEFINE_string("mode", "sample", "How channels are chosen, one mode or a comma list (each "
                        "mode's outputs side by side): sample (PruneNet, the reference's sampling), "
                        "topk (largest policy logits), random (uniform baseline, no policy), energy "
                        "(largest E[h^2]*||down_j||^2 on calibration tokens; forward passes, no "
                        "policy), compensated (energy's or greedy-OBS channels with the kept "
                        "down_proj columns re-fitted, chosen per layer on held-out calibration rows)")
    flags.DEFINE_bool("guard", False, "Never drop super channels: log(||gate_j||*||up_j||) more than 6 "
                      "robust z-scores above its layer's median (energy: also peak |h_j| outliers)")
    flags.DEFINE_integer("seed", 42, "Seed of every random draw (policy init, episodes, slicing)")
    with group(TRAINING):
        flags.DEFINE_float("train_ratio", None, "Ratio the policy is trained at (default: the "
                           "largest of --ratios); the trained policy then prunes at every ratio")
        flags.DEFINE_integer("episodes", 20, "Training episodes")
        flags.DEFINE_integer("checkpoint_every", 1, "With --out_dir, save the training state every "
                             "this many episodes (and after the last); a resumed run repeats at "
                             "most this many - 1")
        flags.DEFINE_float("lr", 1e-3, "AdamW learning rate")
        flags.DEFINE_float("gamma", 0.99, "Discount across layer depth")
        flags.DEFINE_enum("update_schedule", "layer", episode.SCHEDULES, "layer: one AdamW step per "
                          "layer (the paper's code); episode: one step per episode, grad-norm clip 1.0")
        flags.DEFINE_bool("use_kl", False, "Add the KL term to the loss")
        flags.DEFINE_bool("reuse_noise", False, "Loss pass reuses the sampling noise (default: fresh "
                          "noise, as the reference)")
    with group(ENERGY):
        flags.DEFINE_string("calibration", "self", "energy's calibration tokens: self (sampled from "
                            "the dense model, no data) or text files (comma list, globs)")
        flags.DEFINE_integer("calibration_sequences", calibration.Calibration.sequences,
                             "energy: calibration sequences N (with compensated in --mode the "
                             f"default is {calibration.COMPENSATED_POOL[0]})")
        flags.DEFINE_integer("calibration_seq_len", calibration.Calibration.seq_len,
                             "energy: tokens per calibration sequence T (with compensated in --mode "
                             f"the default is {calibration.COMPENSATED_POOL[1]})")
    with group(OUTPUTS):
        flags.DEFINE_bool("export_hf", False, "Also write each pruned model as a Hugging Face "
                          "folder (ratio_<r>/hf: config.json, safetensors, tokenizer, model card)")
        flags.DEFINE_bool("torch_format", False, "With --export_hf, also write pytorch_model.bin "
                          "(needs torch)")
        define_gguf_flags("pruned")
        flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run in --out_dir")


def define_gguf_flags(what: str) -> None:
    """--export_gguf and --gguf_type (launch.prune, launch.batch_prune, launch.recover)."""
    flags.DEFINE_bool("export_gguf", False, f"Also write each {what} model as a GGUF file for "
                      "llama.cpp, Ollama, LM Studio (ratio_<r>/gguf/<name>.gguf)")
    flags.DEFINE_enum("gguf_type", gguf_export.DEFAULT_GGUF_TYPE, gguf_export.GGUF_TYPES,
                      gguf_export.TYPE_HELP)


@group(DEVICES)
def define_mesh_flag() -> None:
    flags.DEFINE_integer("mesh", 0, "Devices on the layer axis (0: all devices of all hosts)")


@group(DEVICES)
def define_parallel_flags() -> None:
    define_mesh_flag()
    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                        "(jax.distributed.initialize); unset on one host")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index")


# ----------------------------------------------------------------------------- flags -> configs

def parse_ratios(spec: str) -> list[float]:
    try:
        ratios = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ratios={spec!r} is not a comma-separated list of numbers; "
                        "pass e.g. --ratios=0.1,0.2,0.3") from None
    if not ratios:
        raise UserError("--ratios is empty; pass e.g. --ratios=0.1,0.2,0.3")
    folders = set()
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise UserError(f"ratio {r} in --ratios is outside [0, 1); pass ratios such as 0.2")
        if run_dir.ratio_dirname(r) in folders:  # exact names: only equal ratios share one
            raise UserError(f"ratio {r} appears twice in --ratios={spec}; list each ratio once")
        folders.add(run_dir.ratio_dirname(r))
    return ratios


def training(ratios: list[float]) -> Training:
    cfg = episode.TrainConfig(ratio=train_ratio(ratios, FLAGS.train_ratio), gamma=FLAGS.gamma,
                              schedule=FLAGS.update_schedule, learning_rate=FLAGS.lr,
                              use_kl=FLAGS.use_kl, reuse_noise=FLAGS.reuse_noise)
    return Training(cfg, episodes=FLAGS.episodes, checkpoint_every=FLAGS.checkpoint_every)


def output_options(resume: bool = False) -> OutputOptions:
    """resume: a recovery fine-tune (--recover_steps, when defined) continues from its state."""
    return OutputOptions(modes=prune.parse_modes(FLAGS.mode), seed=FLAGS.seed,
                         export_hf=FLAGS.export_hf, torch_format=FLAGS.torch_format,
                         export_gguf=FLAGS.export_gguf, gguf_type=FLAGS.gguf_type,
                         guard=FLAGS.guard, recover=recover_spec(resume))


def warn_ignored_flags(policy_given: bool) -> None:
    """One warning per flag given on the command line that the run will not use: training flags
    when no policy is trained, calibration flags without --mode=energy, recovery flags at
    --recover_steps=0 (launch.prune, launch.batch_prune)."""
    modes = prune.parse_modes(FLAGS.mode)
    unused = []
    if policy_given or not set(modes) & set(prune.POLICY_MODES):
        why = "--policy is given" if policy_given else f"--mode={FLAGS.mode} trains no policy"
        unused += [(n, why) for n in _GROUPS.get(TRAINING, []) if n != "policy"]
    if not set(modes) & set(prune.SCORE_MODES):
        unused += [(n, f"--mode={FLAGS.mode} measures no scores (only energy and compensated do)")
                   for n in _GROUPS.get(ENERGY, []) if n != "scores"]
    if "recover_steps" in FLAGS and not recover_steps():
        unused += [(n, "--recover_steps=0: no recovery runs")
                   for n in _GROUPS.get(RECOVERY, []) if n not in ("recover_steps", "recover")]
    for name, why in unused:
        if name in FLAGS and FLAGS[name].present:
            progress.warning(f"--{name} is ignored: {why}")


def calibration_config() -> calibration.Calibration:
    """energy's calibration (checked by the job, when a mode uses it); with compensated in --mode,
    a size not given defaults to calibration.COMPENSATED_POOL (the fit needs a larger pool)."""
    pool = (calibration.COMPENSATED_POOL if "compensated" in prune.parse_modes(FLAGS.mode)
            else (calibration.Calibration.sequences, calibration.Calibration.seq_len))
    given = lambda name, default: FLAGS[name].value if FLAGS[name].present else default
    return calibration.Calibration(FLAGS.calibration, given("calibration_sequences", pool[0]),
                                   given("calibration_seq_len", pool[1]), FLAGS.seed)


def eval_settings(dtype_name: str = "float32") -> EvalConfig:
    """The perplexity settings, checked, without the texts (see `with_texts`)."""
    cfg = EvalConfig(texts={}, name=FLAGS.eval_text or "", seq_len=FLAGS.seq_len,
                     batch_size=FLAGS.batch_size, max_tokens=FLAGS.max_tokens,
                     dtype=weights.dtype_by_name(dtype_name))
    cfg.check()
    return cfg


def with_texts(cfg: EvalConfig) -> EvalConfig:
    """`cfg` with --eval_text read (unchanged without --eval_text)."""
    return dataclasses.replace(cfg, texts=texts.read_texts(cfg.name)) if cfg.name else cfg


def eval_config() -> Optional[EvalConfig]:
    """The perplexity settings with --eval_text read; None without --eval_text."""
    cfg = eval_settings()
    return with_texts(cfg) if cfg.name else None


@group(RECOVERY)
def define_recovery_flags(default_steps: int) -> None:
    """Recovery fine-tuning (launch.recover; launch.prune/batch_prune with --recover_steps)."""
    from prunenet_jax.recovery.config import RecoverConfig, METHODS
    from prunenet_jax.recovery.objectives import OBJECTIVES

    d = RecoverConfig()
    flags.DEFINE_integer("recover_steps", default_steps, "Recovery fine-tuning steps"
                         + (" (0: none; --recover: the default recovery)" if default_steps == 0
                            else ""))
    if default_steps == 0:  # the prune launchers: recovery is opt-in
        flags.DEFINE_bool("recover", False, f"Recover each pruned model with the default recovery "
                          f"before writing it: the down_proj refit, then {d.steps} LoRA "
                          f"self-distillation steps on text the dense model samples (no data); "
                          f"the same as --recover_steps={d.steps}")
    flags.DEFINE_enum("method", d.method, METHODS, "lora: train low-rank factors on q/k/v/o/gate/"
                      "up/down, merged into the weights at the end; full: train every weight")
    flags.DEFINE_enum("objective", d.objective, OBJECTIVES, "distill: KL(dense || pruned) on text "
                      "sampled from the dense model (no data); lm: next-token loss on --train_text")
    flags.DEFINE_string("train_text", None, "Training text files (path, glob, comma-separated): "
                        "required by --objective=lm; with distill, used instead of sampled text")
    flags.DEFINE_float("recover_lr", d.lr, "Peak AdamW learning rate of recovery")
    flags.DEFINE_integer("warmup", d.warmup, "Linear warm-up steps, then cosine decay to 0.1 x peak")
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay of recovery")
    flags.DEFINE_float("clip_norm", d.clip_norm, "Gradient clipping (global norm)")
    flags.DEFINE_integer("lora_rank", d.lora_rank, "LoRA rank")
    flags.DEFINE_float("lora_alpha", d.lora_alpha, "LoRA alpha (the update is scaled by alpha/rank)")
    flags.DEFINE_integer("train_batch", d.batch_size, "Sequences per micro-batch (split over devices)")
    flags.DEFINE_integer("grad_accum", d.grad_accum, "Micro-batches accumulated per step")
    flags.DEFINE_integer("train_seq_len", d.seq_len, "Tokens per training sequence")
    flags.DEFINE_integer("pool_rows", d.pool_rows, "distill: sequences sampled from the dense model "
                         "(0: one fresh sequence per row trained, steps x batch x accum, and at least "
                         "--refit_rows with --refit)")
    flags.DEFINE_integer("recover_seed", d.seed, "Seed of LoRA init, sampling and data order")
    flags.DEFINE_enum("compute_dtype", d.compute_dtype, ["auto", "float32", "bfloat16"],
                      "auto: bfloat16 on accelerators (fp32 master weights), float32 on CPU")
    flags.DEFINE_enum("teacher_cache", d.teacher_cache, ["auto", "on", "off"], "distill: run the "
                      "dense model once over the training text and keep its top-k next-token "
                      "log-probs (bf16) instead of running it every step, freeing its memory; "
                      "auto: when the dense model and the training state would not fit 70% of "
                      "one device (never on CPU)")
    flags.DEFINE_integer("teacher_topk", d.teacher_topk, "Tokens per position the teacher cache keeps")
    flags.DEFINE_bool("refit", d.refit, "Before training, refit each layer's down_proj (fc2, "
                      "dense_4h_to_h) by least squares so the pruned layer reproduces the dense one "
                      "on the recovery text (no gradient steps; with --recover_steps=0 on "
                      "launch.recover, the refit alone)")
    flags.DEFINE_integer("refit_rows", d.refit_rows, "Rows of the recovery text the refit fits on "
                         "(0: all)")
    flags.DEFINE_integer("recover_checkpoint_every", 10, "Save the recovery state every this many "
                         "steps (with an output folder; 0: never)")


def recover_steps() -> int:
    """--recover_steps; on the prune launchers, --recover without it: the default recovery's."""
    from prunenet_jax.recovery.config import RecoverConfig

    asked = "recover" in FLAGS and FLAGS.recover
    if not asked or FLAGS["recover_steps"].present and FLAGS.recover_steps:
        return FLAGS.recover_steps
    if FLAGS["recover_steps"].present:
        raise UserError("--recover asks for the default recovery and --recover_steps=0 for none; "
                        "drop one of them")
    return RecoverConfig.steps


def recover_config():
    """The recovery flags as a recovery.config.RecoverConfig (checked with the RecoverSpec that
    holds it)."""
    from prunenet_jax.recovery.config import RecoverConfig

    return RecoverConfig(
        steps=recover_steps(), method=FLAGS.method, objective=FLAGS.objective,
        lr=FLAGS.recover_lr, warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay,
        clip_norm=FLAGS.clip_norm, batch_size=FLAGS.train_batch, grad_accum=FLAGS.grad_accum,
        seq_len=FLAGS.train_seq_len, lora_rank=FLAGS.lora_rank, lora_alpha=FLAGS.lora_alpha,
        pool_rows=FLAGS.pool_rows, seed=FLAGS.recover_seed, compute_dtype=FLAGS.compute_dtype,
        teacher_cache=FLAGS.teacher_cache, teacher_topk=FLAGS.teacher_topk, refit=FLAGS.refit,
        refit_rows=FLAGS.refit_rows)


def recover_spec(resume: bool, optional: bool = True):
    """The recovery the flags ask for (its job checks it: RecoverSpec.check, before anything is
    loaded).
    `optional` (launch.prune/batch_prune, --recover_steps): None at 0 steps, or on a launcher
    without the recovery flags; launch.recover always recovers (0 steps: the refit alone)."""
    if optional and ("recover_steps" not in FLAGS or not recover_steps()):
        return None
    from prunenet_jax.recovery.recover import RecoverSpec

    return RecoverSpec(recover_config(), FLAGS.train_text, FLAGS.recover_checkpoint_every, resume)

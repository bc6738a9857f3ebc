"""Flags and helpers shared by the pruning launchers (prune.py, batch_prune.py): ratios, policy
training, channel selection, perplexity, HF export."""
from __future__ import annotations

from typing import Callable, Optional

from absl import flags

from prunenet_jax import prune
from prunenet_jax.evaluation import perplexity as evaluate
from prunenet_jax import sources as hf_io
from prunenet_jax.method import sampling
from prunenet_jax.evaluation import texts
from prunenet_jax.method import train
from prunenet_jax.launch import common
from prunenet_jax.models import llama
from prunenet_jax.weights import ModelWeights

FLAGS = flags.FLAGS
flags.DEFINE_string("ratios", "0.1,0.2,0.3", "Comma-separated compression ratios in [0, 1)")
flags.DEFINE_float("train_ratio", None, "Ratio the policy is trained at (default: the largest of "
                   "--ratios); the trained policy then prunes at every ratio")
flags.DEFINE_integer("episodes", 20, "Training episodes")
flags.DEFINE_integer("checkpoint_every", 1, "With --out_dir, save the training state every this many "
                     "episodes (and after the last); a resumed run repeats at most this many - 1")
flags.DEFINE_float("lr", 1e-3, "AdamW learning rate")
flags.DEFINE_float("gamma", 0.99, "Discount across layer depth")
flags.DEFINE_integer("seed", 42, "Seed of every random draw (policy init, episodes, slicing)")
flags.DEFINE_enum("mode", "sample", prune.MODES, "How channels are chosen when pruning: sample "
                  "(the reference), topk (largest logits, no noise), random (baseline, no policy)")
flags.DEFINE_enum("update_schedule", "layer", train.SCHEDULES, "layer: one AdamW step per layer "
                  "(the paper's code); episode: one step per episode, grad-norm clip 1.0")
flags.DEFINE_bool("use_kl", False, "Add the KL term to the loss")
flags.DEFINE_bool("reuse_noise", False, "Loss pass reuses the sampling noise (default: fresh noise, "
                  "as the reference)")
flags.DEFINE_string("eval_text", None, "Text files for perplexity of the dense and each pruned "
                    "model (comma-separated; a glob is one text of its sorted matches)")
flags.DEFINE_integer("max_tokens", 0, "Tokens per text to score (0: all)")
flags.DEFINE_integer("seq_len", 512, "Perplexity window length")
flags.DEFINE_integer("batch_size", 4, "Perplexity windows per forward pass")
flags.DEFINE_bool("export_hf", False, "Also write each pruned model as a Hugging Face folder "
                  "(ratio_<r>/hf: config.json, safetensors, tokenizer, model card)")
flags.DEFINE_bool("torch_format", False, "With --export_hf, also write pytorch_model.bin (needs torch)")
flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run in --out_dir")


def parse_ratios(spec: str) -> list[float]:
    try:
        ratios = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise common.UserError(f"--ratios={spec!r} is not a comma-separated list of numbers; "
                               "pass e.g. --ratios=0.1,0.2,0.3") from None
    if not ratios:
        raise common.UserError("--ratios is empty; pass e.g. --ratios=0.1,0.2,0.3")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise common.UserError(f"ratio {r} in --ratios is outside [0, 1); pass ratios such as 0.2")
    return ratios


def check(ratios: list[float]) -> None:
    """Refuses bad values of the shared flags, before anything is loaded."""
    if FLAGS.episodes < 1:
        raise common.UserError(f"--episodes={FLAGS.episodes}: train for at least 1 episode")
    if FLAGS.checkpoint_every < 1:
        raise common.UserError(f"--checkpoint_every={FLAGS.checkpoint_every} must be at least 1")
    if FLAGS.max_tokens < 0:
        raise common.UserError(f"--max_tokens={FLAGS.max_tokens} must be >= 0 (0 means all)")
    if FLAGS.torch_format and not FLAGS.export_hf:
        raise common.UserError("--torch_format adds pytorch_model.bin to the HF export; pass "
                               "--export_hf too")
    if FLAGS.export_hf and not FLAGS.out_dir:
        raise common.UserError("--export_hf needs --out_dir")


def train_config(ratios: list[float]) -> train.TrainConfig:
    ratio = max(ratios) if FLAGS.train_ratio is None else FLAGS.train_ratio
    return train.TrainConfig(ratio=ratio, gamma=FLAGS.gamma, schedule=FLAGS.update_schedule,
                             learning_rate=FLAGS.lr, use_kl=FLAGS.use_kl,
                             reuse_noise=FLAGS.reuse_noise)


def check_ratios_fit(intermediate_size: int, ratios: list[float], source: str) -> None:
    """Refuses a ratio that keeps no channel of this model."""
    for r in ratios:
        try:
            sampling.num_kept(intermediate_size, r)
        except common.UserError as e:
            raise common.UserError(f"{source}: {e}") from None


def eval_texts() -> Optional[dict]:
    return texts.read_texts(FLAGS.eval_text) if FLAGS.eval_text else None


def ppl_fn(weights: ModelWeights, eval_texts: Optional[dict]) -> Callable[[ModelWeights], Optional[float]]:
    """Perplexity on --eval_text of a model with `weights`' tokenizer (None without --eval_text)."""
    if eval_texts is None:
        return lambda w: None
    tokenizer = hf_io.load_tokenizer(weights)

    def ppl(w: ModelWeights) -> float:
        model = llama.from_named_arrays(w.config, w.named_arrays())
        return evaluate.perplexity(model, tokenizer, eval_texts, seq_len=FLAGS.seq_len,
                                   batch_size=FLAGS.batch_size,
                                   max_tokens=FLAGS.max_tokens or None)["ppl"]

    return ppl

"""What the evaluation report measures of a dense model and its pruned versions: gate spectra, the
KS statistic per layer, each model's record, and a short greedy continuation.

Spectra: each model's gate matrices (L, I, H) are the only weights needed; their singular values
are computed once per model (`spectral.singular_values`, in jax). A pruned model's distance to the
dense one is, per layer, the KS statistic of the two gate spectra (`spectral.ks_statistic`): the
quantity whose inverse PruneNet's policy is rewarded with.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunenet_jax import perplexity
from prunenet_jax.errors import UserError
from prunenet_jax.method import spectral
from prunenet_jax.models import registry
from prunenet_jax.weights import ModelWeights

_layer_sv = jax.jit(spectral.singular_values)
_ks = jax.jit(spectral.spectra_ks)

def gate_spectra(weights: ModelWeights) -> np.ndarray:
    """Singular values of every layer's gate matrix, (L, min(I, H)), descending, float32.

    One layer at a time, so device memory holds one matrix whatever the model size."""
    W = weights.layers[registry.scored(weights.config)]
    return np.stack([np.asarray(_layer_sv(jnp.asarray(W[l], jnp.float32))) for l in range(len(W))])


def gate_ks(dense_sv: np.ndarray, sv: np.ndarray) -> np.ndarray:
    """KS statistic per layer between the dense model's gate spectra (L, m) and another model's
    (L, m') (method/spectral.layer_ks is the same statistic inside training, from kept rows)."""
    if len(dense_sv) != len(sv):
        raise UserError(f"a pruned model has {len(sv)} layers but the dense model {len(dense_sv)}; "
                        "compare models pruned from the same dense model")
    return np.asarray(_ks(jnp.asarray(dense_sv), jnp.asarray(sv)))


def compare(dense: ModelWeights, pruned: Sequence[ModelWeights]) -> tuple[list, list]:
    """(spectra, ks) for the dense model followed by each pruned one; the dense model's KS is 0."""
    spectra = [gate_spectra(w) for w in (dense, *pruned)]
    return spectra, [gate_ks(spectra[0], sv) for sv in spectra]


def plotted_layers(num_layers: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, num_layers // 2, num_layers - 1})


def model_record(name: str, source: str, weights: ModelWeights, ratio: float, ks: np.ndarray,
                 perplexity: Optional[dict] = None, mode: Optional[str] = None,
                 continuation: Optional[str] = None, recovery: Optional[dict] = None) -> dict:
    """One model's row of report.json. `perplexity`: perplexity.perplexity's result, or None;
    `mode`: how a pruned model's channels were chosen; `continuation`: its greedy continuation
    of PROMPT; `recovery`: the manifest's record of its recovery fine-tune."""
    record = {"name": name, "source": source, "ratio": float(ratio),
              "kept": int(weights.config.intermediate_size), "params": int(weights.num_params()),
              "ppl": perplexity["ppl"] if perplexity else None,
              "accuracy": perplexity.get("accuracy") if perplexity else None,
              "ppl_files": perplexity["files"] if perplexity else None,
              "ks": [float(x) for x in ks], "mean_ks": float(np.mean(ks)), "lm_eval": None}
    if mode is not None:
        record["mode"] = mode
    if continuation is not None:
        record["continuation"] = continuation
    if recovery:
        record["recovery"] = {k: recovery.get(k) for k in
                              ("steps", "method", "objective", "ppl_before", "ppl_after", "eval")}
    return record


def add_retention(models: list[dict]) -> list[dict]:
    """Sets each record's "accuracy_retention": the share of the dense model's (the first
    record's) top-1 accuracy it keeps; None when that is not defined (perplexity.accuracy_retention)."""
    dense = models[0].get("accuracy") if models else None
    for m in models:
        m["accuracy_retention"] = perplexity.accuracy_retention(m.get("accuracy"), dense)
    return models


def ppl_before_recovery(model: dict, summary: dict) -> Optional[float]:
    """A recovered model's recorded ppl before its fine-tune, when it was measured as this report
    measures (same texts, tokens and windows), so it can stand beside the report's own values."""
    rec = model.get("recovery")
    if not rec or rec.get("ppl_before") is None or not summary.get("eval"):
        return None
    return rec["ppl_before"] if rec.get("eval") == summary["eval"] else None


PROMPT = "The Python programming language is"
CONTINUATION_TOKENS = 24


def continuation(weights: ModelWeights, tokenizer) -> str:
    """The model's greedy continuation of PROMPT (CONTINUATION_TOKENS tokens at most)."""
    from prunenet_jax import special_tokens
    from prunenet_jax.models import decode, decoder

    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    ids = list(tokenizer(PROMPT)["input_ids"])
    eos = special_tokens.eos_ids(weights, lambda: tokenizer)
    out = decode.generate(model, [ids], CONTINUATION_TOKENS, eos_ids=eos)[0]
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text.strip():
        return text
    return blank_continuation(out, set(getattr(tokenizer, "all_special_ids", None) or ()) | set(eos))


def blank_continuation(ids: Sequence[int], special: set) -> str:
    """What a continuation that decodes to nothing visible was, in place of an empty cell:
    "(16 special tokens, id 6)", "(3 tokens, whitespace only)", "(no tokens)"."""
    ids = [int(t) for t in ids]
    if not ids:
        return "(no tokens)"
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")
    distinct = sorted({t for t in ids if t in special})
    named = f"{'id' if len(distinct) == 1 else 'ids'} {', '.join(map(str, distinct))}"
    if len(distinct) and all(t in special for t in ids):
        return f"({plural(len(ids), 'special token')}, {named})"
    n_special = sum(t in special for t in ids)
    if n_special:
        return f"({plural(len(ids), 'token')}: {n_special} special, {named}; the rest whitespace)"
    return f"({plural(len(ids), 'token')}, whitespace only)"

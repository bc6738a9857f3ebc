"""Whether a dense model is a pruned model's source (its parent): refused before any training when
their shapes (`check_parent_shapes`, from configs alone) or the tensors pruning leaves untouched
(`check_parent`) disagree."""
from __future__ import annotations

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.models import registry
from prunenet_jax.weights import ModelWeights


def check_parent_shapes(a, b, pruned_name: str, dense_name: str) -> None:
    """Refuses a dense config that cannot be the pruned one's source: all but the FFN width agree."""
    fields = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "model_type")
    diff = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if not diff and a.intermediate_size > b.intermediate_size:
        diff = [f"intermediate_size {a.intermediate_size} > {b.intermediate_size}"]
    if diff:
        raise UserError(f"{pruned_name} cannot be a pruned version of {dense_name} ({', '.join(diff)}); "
                        "pass its source model with --dense")


def check_parent(pruned: ModelWeights, dense: ModelWeights, pruned_name: str, dense_name: str) -> None:
    """Refuses a dense model that is not the pruned model's source: the shapes, and the tensors
    pruning leaves untouched (embeddings, attention, norms), must agree."""
    check_parent_shapes(pruned.config, dense.config, pruned_name, dense_name)
    untouched = [registry.EMBED, registry.FINAL_NORM, registry.Q, registry.K, registry.V,
                 registry.O, registry.INPUT_NORM]
    for name in untouched:
        if name not in dense.globals and name not in dense.layers:  # e.g. no final norm (OPT-350m)
            continue
        x = pruned.globals.get(name, pruned.layers.get(name))
        y = dense.globals.get(name, dense.layers.get(name))
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if np.max(np.abs(x - y)) > 1e-2 * (np.max(np.abs(y)) + 1e-12):  # bf16 rounding passes
            raise UserError(f"{pruned_name} was not pruned from {dense_name}: their {name!r} "
                            "differ (pruning leaves it unchanged); pass its source model with --dense")

"""The embedded default model (SmolLM2-135M-Instruct GGUF): our Flax logits against transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from prunenet_jax import sources
from prunenet_jax.models import decoder, registry

SENTENCE = ("The quick brown fox jumps over the lazy dog, and then it runs into the forest "
            "to find some water before the sun goes down.")


def test_default_model_logits_match_transformers(hf_default_model):
    weights = sources.load_model("default")
    tokenizer = sources.load_tokenizer(weights)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert len(ids) > 20
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    got = np.asarray(model(jnp.asarray([ids])))
    with torch.no_grad():
        want = hf_default_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    # Same next-token predictions, and they are sensible (not a broken model that agrees by luck).
    assert (got.argmax(-1) == want.argmax(-1)).all()
    logp = np.asarray(jax.nn.log_softmax(got[0, :-1], axis=-1))
    ppl = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
    assert ppl < 100  # a uniform guess over 49,152 tokens would score ~49,152


def test_default_gate_stack_equals_full_load():
    full = sources.load_model("default").layers[registry.GATE]
    cfg, stack = sources.load_gate_stack("default")
    assert stack.shape == full.shape == (30, 1536, 576)
    np.testing.assert_array_equal(stack[28:30], full[28:30])

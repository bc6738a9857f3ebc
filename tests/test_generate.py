"""The KV-cache sampler against transformers, its sampling rules, and the generate launcher."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder, decode
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every architecture, and a Mistral whose window (5) is shorter than prompt + continuation.
CASES = sorted((n, {}) for n in tiny_models.CONFIGS) + [
    ("mistral", {"sliding_window": 5}),  # every layer windowed, and only layers 1.. of the qwen2
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    ("qwen3_windowed", {"sliding_window": 5}), ("phi3_longrope", {"sliding_window": 5}),
    ("gemma2", {"sliding_window": 5}), ("gemma3", {"sliding_window": 5})]


def _pair(tmp_path, name, **overrides):
    hf = tiny_models.make_hf_model(name, **overrides)
    weights = sources.load_model(tiny_models.save_hf_model(hf, tmp_path / name))
    return hf, decoder.from_named_arrays(weights.config, weights.named_arrays())


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}{'-window5' if o else ''}" for n, o in CASES])
def test_cached_logits_equal_the_full_forward(tmp_path, name, overrides):
    """Prefill two prompts of different lengths (left-padded together), then feed a forced
    continuation one token at a time: every next-token logit equals transformers' full forward
    on the unpadded sequence (and ours, where the window allows a full forward)."""
    hf, model = _pair(tmp_path, name, **overrides)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 9)]
    forced = rng.integers(0, 97, (2, 8))
    _, pad, logits, cache = decode.prefill(model, prompts, forced.shape[1])
    got = [np.asarray(logits)]
    step = jax.jit(lambda c, t: decode.decode_step(model, c, t, pad))
    for j in range(forced.shape[1]):
        logits, cache = step(cache, jnp.asarray(forced[:, j], jnp.int32))
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)  # (B, 1 + len(forced), V)
    for b, prompt in enumerate(prompts):
        seq = np.array(prompt + forced[b].tolist())
        with torch.no_grad():
            want = hf(torch.tensor(seq[None])).logits[0, len(prompt) - 1:].numpy()
        assert np.abs(got[b] - want).max() < 1e-4, np.abs(got[b] - want).max()
        ours = np.asarray(model(jnp.asarray(seq[None])))[0, len(prompt) - 1:]
        assert np.abs(got[b] - ours).max() < 1e-4  # the cache path is the full forward's
    assert np.abs(got).max() > 0.1


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}{'-window5' if o else ''}" for n, o in CASES])
def test_greedy_equals_transformers_on_tiny_models(tmp_path, name, overrides):
    """A right-padded batch (unpadded by `decode.unpad`) decodes as transformers' greedy search
    does on each prompt alone."""
    hf, model = _pair(tmp_path, name, **overrides)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 97, (2, 7))
    mask = np.ones_like(tokens)
    mask[0, 4:] = 0
    got = decode.generate(model, decode.unpad(tokens, mask), 12)
    for row, keep, out in zip(tokens, mask.astype(bool), got):
        with torch.no_grad():
            want = hf.generate(torch.tensor(row[keep][None]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, keep.sum():].tolist()
        assert out == want


def test_default_model_greedy_equals_transformers(hf_default_model):
    """32 greedy tokens from two prompts of different lengths, batched, token for token."""
    from prunenet_jax.formats import gguf as gguf_io
    from prunenet_jax.formats import gguf_tokenizer

    weights = sources.load_model("default")
    tokenizer = gguf_tokenizer.load_gguf_tokenizer(gguf_io.default_model_path())
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    prompts = [tokenizer(p)["input_ids"] for p in (
        "The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.")]
    got = decode.generate(model, prompts, 32)
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            want = hf_default_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                             eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        assert out == want, (tokenizer.decode(out), tokenizer.decode(want))
        assert len(out) == 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("m"), "llama_gqa_untied")[1]


def test_eos_stops_each_row_and_sampling_is_seeded(tiny):
    prompts = [[5, 6, 7], [9, 3]]
    greedy = decode.generate(tiny, prompts, 10)
    first = greedy[0][2]  # row 0 stops at its third token, row 1 goes on (unless it meets it)
    stopped = decode.generate(tiny, prompts, 10, eos_ids=[first, 96])
    assert stopped[0] == greedy[0][:3]
    cut = next((i for i, t in enumerate(greedy[1]) if t in (first, 96)), 9)
    assert stopped[1] == greedy[1][:cut + 1]
    a = decode.generate(tiny, prompts, 10, temperature=1.0, seed=3)
    assert a == decode.generate(tiny, prompts, 10, temperature=1.0, seed=3)
    assert a != decode.generate(tiny, prompts, 10, temperature=1.0, seed=4)
    # A nucleus this small holds only the most likely token: greedy.
    assert decode.generate(tiny, prompts, 10, temperature=0.7, top_p=1e-6, seed=5) == greedy


def test_top_p_draws_only_from_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: decode._pick(logits, k, False, True, 1.0, 0.7))(
        jax.random.split(jax.random.key(0), 4000))[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.7: the rest is cut
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03
    hot = jax.vmap(lambda k: decode._pick(logits, k, False, False, 2.0, 1.0))(
        jax.random.split(jax.random.key(1), 4000))[:, 0]
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 0.5
    np.testing.assert_allclose(np.bincount(np.asarray(hot), minlength=4) / 4000, p / p.sum(), atol=0.03)


def test_decode_compiles_once_per_batch_and_cache_size(tiny):
    decode.generate(tiny, [[1, 2, 3]], 8)
    before = decode._decode._cache_size()
    # Other prompt lengths in the same bucket, another length, temperature and seed: no compile.
    decode.generate(tiny, [[4, 5, 6, 7, 8]], 5, temperature=0.0, seed=9)
    decode.generate(tiny, [[4]], 7, eos_ids=[3, 4])
    assert decode._decode._cache_size() == before


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_arguments(tiny, kwargs, fragment):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(UserError, match=fragment):
        decode.generate(tiny, [[1, 2]], args.pop("max_new_tokens"), **args)
    with pytest.raises(UserError, match="prompt"):
        decode.generate(tiny, [[1, 2], []], 4)


def _launch(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,fragment", [
    (["--model=/no/such/model", "--prompt=hi"], "/no/such/model"),
    (["--prompt=hi", "--max_new_tokens=0"], "--max_new_tokens"),
    (["--prompt=hi", "--temperature=-0.5"], "--temperature"),
    (["--prompt=hi", "--top_p=0"], "--top_p"),
    (["--prompt=hi", "--top_p=1.5"], "--top_p"),
    (["--max_new_tokens=3"], "--prompt"),
])
def test_launcher_user_errors(args, fragment):
    proc = _launch(*args, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_launcher_chat_without_template_is_refused(tmp_path):
    from prunenet_jax.formats import gguf as gguf_io
    from prunenet_jax.formats import gguf_tokenizer

    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "m")
    tokenizer = gguf_tokenizer.load_gguf_tokenizer(gguf_io.default_model_path())
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    proc = _launch(f"--model={folder}", "--prompt=hi", "--chat")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "chat template" in last, proc.stderr


def test_launcher_on_the_default_model():
    proc = _launch("--model=default", "--prompt=The capital of France is", "--max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "The capital of France is"
    assert 1 <= len(out["tokens"]) <= 8 and "Paris" in out["completion"]
    assert proc.stdout.startswith(out["completion"])

"""GGUF export (formats/gguf_export.py): pruned models written as llama.cpp reads them.

Each tiny family checkpoint (built with transformers, given a byte-level BPE tokenizer) is pruned
to a width that is not a multiple of 32 and exported; the file is read back
- by our own reader: every tensor and the config equal the pruned model's;
- by the `gguf` reader: the pruned feed_forward_length, the general.* and prunenet.* keys;
- against llama.cpp's converter (tests/test_gguf_families.convert, run on the pruned model's HF
  export): the same tensors under the same names and the same architecture metadata;
- by transformers' own GGUF loader, for the architectures it reads as we do: logits equal to our
  pruned model's in f32, token ids equal to the HF tokenizer's.
The default model (a GGUF source: tokenizer copied) is exported as f16 and q8_0 (every float type
on a tiny model), and the launchers'
--export_gguf / --to=gguf, the refusals before training and the atomic write are checked.
"""
import json
import os

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from prunenet_jax import prune, sources
from prunenet_jax.errors import UserError
from prunenet_jax.formats import (gguf as gguf_format, gguf_export, gguf_tokenizer, gguf_vocab,
                                  hf_export)
from prunenet_jax.models import decoder
from tests import test_gguf_families as families_test, tiny_models

VOCAB = 300
MIXED_TEXT = ("Hello wörld! 12345 naïve café — π ≈ 3.14159, 日本語 <s> tabs\tand   spaces\n"
              "def f(x): return x ** 2  # 100%")

# tiny_models entries (and overrides) exported; those in families_test.CASES are also compared
# with what llama.cpp's converter writes.
EXPORT_CASES = {
    "llama_tied": {}, "llama_gqa_untied": {}, "llama3_rope_bias": {}, "qwen2": {},
    "mistral": {}, **families_test.CASES,
}
# Overrides under which transformers' GGUF loader reads a file as we do (see
# test_gguf_families.AS_TRANSFORMERS_READS). phi2 and gptneox it does not read; Falcon it reads
# with an FFN of 4 x hidden whatever feed_forward_length says, so not a pruned one (llama.cpp
# reads the stated width); Phi-3 without longrope and partial rotary.
TRANSFORMERS_READS = {
    "llama_tied": {}, "llama_gqa_untied": {}, "qwen2": {}, "mistral": {},
    **families_test.AS_TRANSFORMERS_READS,
}


def add_tokenizer(folder, vocab=VOCAB):
    """A byte-level BPE tokenizer of `vocab` tokens (GPT-2's pre-tokenizer), trained on a little
    text, with <s> and </s>, saved as transformers saves one."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab - 2, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([MIXED_TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20],
                            trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny_folder(tmp, name, **overrides):
    hf = tiny_models.make_hf_model(name, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                   **overrides)
    folder = tiny_models.save_hf_model(hf, tmp / "hf")
    add_tokenizer(folder)
    return folder


def pruned_of(folder, seed=0):
    """The folder's model with a random 5/6 of each layer's channels kept (a width that is not
    a multiple of 32)."""
    weights = sources.load_model(folder)
    cfg = weights.config
    keep = cfg.intermediate_size * 5 // 6
    rng = np.random.default_rng(seed)
    kept = np.stack([np.sort(rng.choice(cfg.intermediate_size, keep, replace=False))
                     for _ in range(cfg.num_hidden_layers)])
    return prune.slice_weights(weights, kept)


CARD = {"source": "tiny", "ratio": 0.17, "mode": "random", "kept": 0, "seed": 3}


@pytest.fixture(scope="module", params=sorted(EXPORT_CASES))
def exported(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    folder = tiny_folder(tmp, name, **EXPORT_CASES[name])
    pruned = pruned_of(folder)
    card = {**CARD, "kept": pruned.config.intermediate_size}
    path = gguf_export.export_gguf(pruned, tmp / "gguf", gguf_type="f32", model_card=card)
    return name, tmp, folder, pruned, path


def test_our_reader_reads_the_pruned_model_back(exported):
    name, _, _, pruned, path = exported
    back = gguf_format.load_gguf(path)
    assert back.config == _as_file_holds(pruned.config)
    for group in ("globals", "layers"):
        ours, theirs = getattr(pruned, group), getattr(back, group)
        assert ours.keys() == theirs.keys()
        for k in ours:
            np.testing.assert_allclose(theirs[k], ours[k], rtol=0, atol=2.5e-7, err_msg=k)


def _as_file_holds(cfg):
    """What a file holds of `cfg`: mistral is written as llama (no window)."""
    import dataclasses

    if cfg.model_type == "mistral":
        return dataclasses.replace(cfg, model_type="llama", sliding_window=None)
    return cfg


def test_metadata_says_the_pruned_width_and_what_was_done(exported):
    name, _, _, pruned, path = exported
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    assert r.fields[f"{arch}.feed_forward_length"].contents() == pruned.config.intermediate_size
    assert r.fields["general.name"].contents() == "tiny pruned 0.17"
    assert "17% of each layer's FFN channels" in r.fields["general.description"].contents()
    assert r.fields["prunenet.mode"].contents() == "random"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 0
    assert os.path.basename(path) == "tiny-pruned-0.17.gguf"


@pytest.mark.parametrize("name", sorted(families_test.CASES))
def test_same_file_as_llama_cpps_converter(tmp_path, name):
    """Our export and llama.cpp's converter (run on the pruned model's HF export) hold the same
    tensors under the same names, and the same architecture keys, except what the converter
    gets wrong for a pruned model (Phi-2's and Falcon's feed_forward_length: 4 x hidden) or
    leaves to llama.cpp's defaults (rope.freq_base, Falcon's context length)."""
    folder = tiny_folder(tmp_path, name, **families_test.CASES[name])
    pruned = pruned_of(folder)
    ours = gguf.GGUFReader(gguf_export.export_gguf(pruned, tmp_path / "gguf", gguf_type="f32"))
    hf_dir = hf_export.export_hf(pruned, tmp_path / "pruned_hf")
    theirs = gguf.GGUFReader(families_test.convert(hf_dir, tmp_path / "converter.gguf"))
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    by_name = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(by_name[t.name].data),
                                      err_msg=t.name)
    arch = ours.fields["general.architecture"].contents()
    skip = {f"{arch}.feed_forward_length", f"{arch}.context_length"}
    for key, field in theirs.fields.items():
        if key.startswith(f"{arch}.") and key not in skip:
            assert key in ours.fields, key
            assert ours.fields[key].contents() == pytest.approx(field.contents()), key


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_READS))
def test_transformers_gguf_loader_gives_our_logits_and_ids(tmp_path, name):
    folder = tiny_folder(tmp_path, name, **TRANSFORMERS_READS[name])
    pruned = pruned_of(folder)
    path = gguf_export.export_gguf(pruned, tmp_path / "gguf", gguf_type="f32")
    out, file = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=file,
                                                               dtype=torch.float32).eval()
    assert _logits_diff(theirs, pruned) < 1e-4
    if pruned.config.model_type != "qwen2":  # transformers gives any qwen2 file Qwen2's regex
        tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=file)
        want = transformers.AutoTokenizer.from_pretrained(folder)
        assert tok(MIXED_TEXT)["input_ids"] == want(MIXED_TEXT)["input_ids"]


def _logits_diff(hf, weights, tokens=None):
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    if tokens is None:
        tokens = np.random.default_rng(1).integers(0, weights.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
    assert np.abs(want).max() > 0.1
    return float(np.abs(got - want).max())


def _agreement(hf, weights, tokens):
    """(mean KL(ours || theirs) per token, share of equal top-1 predictions)."""
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    with torch.no_grad():
        theirs = torch.log_softmax(hf(torch.tensor(tokens)).logits, -1).numpy()[0]
    ours = np.asarray(model(jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))[0]
    ours = ours - np.log(np.exp(ours - ours.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - ours.max(-1, keepdims=True)
    kl = float((np.exp(ours) * (ours - theirs)).sum(-1).mean())
    return kl, float((ours.argmax(-1) == theirs.argmax(-1)).mean())


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_pruned():
    weights = gguf_format.load_gguf(gguf_format.packaged_model_path("default"), source="default")
    cfg = weights.config
    rng = np.random.default_rng(0)
    kept = np.stack([np.sort(rng.choice(cfg.intermediate_size, 1075, replace=False))
                     for _ in range(cfg.num_hidden_layers)])
    return prune.slice_weights(weights, kept)


# Mean KL(ours || transformers' read of the file) per token, per type, and the share of tokens
# whose top-1 prediction must agree. Measured on 256 tokens of the tutorial text with this
# pruned model: f32 0, f16 1.1e-5, bf16 2.1e-4, q8_0 6.0e-3 (top-1 95%, ppl 471.8 -> 486.4: a
# randomly pruned model is fragile); on ENGLISH (60 tokens) f16 gives 5.8e-5. A wrong layout
# gives a KL of order 1.
TOLERANCE = {"f32": (1e-6, 1.0), "f16": (3e-4, 0.95), "bf16": (3e-3, 0.93), "q8_0": (0.05, 0.8)}
ENGLISH = ("Python is an easy to learn, powerful programming language. It has efficient high-level "
           "data structures and a simple but effective approach to object-oriented programming. "
           "Python's elegant syntax and dynamic typing, together with its interpreted nature, make "
           "it an ideal language for scripting and rapid application development in many areas.")


# The real model in the default type and the quantised one (f32 and bf16: the tiny test below and
# the tiny families above; each real-model type costs about a minute of the suite).
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_default_model_f16_and_q8_0(tmp_path, default_pruned, gguf_type):
    path = gguf_export.export_gguf(default_pruned, tmp_path / "gguf", gguf_type=gguf_type,
                                   model_card={"source": "default", "ratio": 0.3})
    out, file = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=file,
                                                               dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=file)
    mixed = MIXED_TEXT + " <|im_start|>user\nhi<|im_end|>"
    source_tok = gguf_tokenizer.load_gguf_tokenizer(default_pruned.gguf_file)
    assert tok(mixed)["input_ids"] == source_tok(mixed)["input_ids"]
    kl, top1 = _agreement(theirs, default_pruned, np.array([tok(ENGLISH)["input_ids"]]))
    print(gguf_type, "KL", kl, "top-1", top1)
    assert kl < TOLERANCE[gguf_type][0] and top1 >= TOLERANCE[gguf_type][1], (kl, top1)
    # the project reads it as --model=file.gguf
    back = sources.load_model(path)
    assert back.config == default_pruned.config
    r = gguf.GGUFReader(path)
    down = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    gate = next(t for t in r.tensors if t.name == "blk.0.ffn_gate.weight")
    norm = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    want_type = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    assert gate.tensor_type.name == want_type
    # 1075 columns are not whole q8_0 blocks: f16, as llama.cpp's converter falls back
    assert down.tensor_type.name == ("F16" if gguf_type == "q8_0" else want_type)
    # the tokenizer keys are the source's, byte for byte
    src = gguf.GGUFReader(default_pruned.gguf_file)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id"):
        assert r.fields[key].contents() == src.fields[key].contents(), key


@pytest.mark.parametrize("gguf_type, dtype", [("f32", np.float32), ("f16", np.float16),
                                              ("bf16", ml_dtypes.bfloat16)])
def test_each_float_type_reads_back_as_the_rounded_weights(tmp_path, gguf_type, dtype):
    """Matrices come back as the weights rounded to the type (q/k permuted and back: the rounding
    is per value), norms and biases exactly (always f32)."""
    pruned = pruned_of(tiny_folder(tmp_path, "llama3_rope_bias"))
    back = dict(sources.load_model(gguf_export.export_gguf(pruned, tmp_path / "gguf",
                                                           gguf_type=gguf_type)).named_arrays())
    for name, arr in pruned.named_arrays():
        want = arr.astype(dtype).astype(np.float32) if arr.ndim == 2 else arr
        np.testing.assert_array_equal(back[name], want, err_msg=name)


@pytest.mark.parametrize("gguf_type", ["q8_0", "bf16"])
def test_tensors_written_in_row_blocks_are_the_same_bytes(tmp_path, monkeypatch, gguf_type):
    """Embeddings, head and FFN matrices are cast and encoded a block of rows at a time: with
    blocks of two rows (one of a down projection), the file is byte for byte the one written in
    one block."""
    pruned = pruned_of(tiny_folder(tmp_path, "llama_gqa_untied"))
    whole = gguf_export.export_gguf(pruned, tmp_path / "whole", gguf_type=gguf_type)
    monkeypatch.setattr(gguf_export, "BLOCK_BYTES", 4 * 64)  # two float32 rows of hidden size 32
    rows = gguf_export.export_gguf(pruned, tmp_path / "rows", gguf_type=gguf_type)
    assert open(whole, "rb").read() == open(rows, "rb").read()


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name, overrides, words", [
    ("opt", {}, "no llama.cpp architecture"),
    ("phi_qk_ln", {}, "qk_layernorm"),
    ("falcon_seq_bias", {}, "Falcon biases"),
    ("gemma2", {}, "query scale"),  # query_pre_attn_scalar 12, not the head size 16
])
def test_unwritable_models_are_refused_by_name(tmp_path, name, overrides, words):
    folder = tiny_folder(tmp_path, name, **overrides)
    config = sources.load_config(folder)
    with pytest.raises(UserError, match=words):
        gguf_export.check_exportable(config, gguf_file=None, tokenizer_dir=folder, source=folder)
    with pytest.raises(UserError, match=words):
        gguf_export.export_gguf(pruned_of(folder), tmp_path / "gguf")
    assert not os.path.exists(tmp_path / "gguf")


def test_tokenizers_we_cannot_convert_are_refused(tmp_path):
    folder = tiny_folder(tmp_path, "llama_tied")
    config = sources.load_config(folder)
    check = lambda: gguf_export.check_exportable(config, gguf_file=None, tokenizer_dir=folder,
                                                 source=folder)
    check()
    path = os.path.join(folder, "tokenizer.json")
    tok = json.load(open(path))
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    json.dump(tok, open(path, "w"))
    with pytest.raises(UserError, match="pre-tokenizer.*Whitespace"):
        check()
    tok["model"]["type"] = "WordPiece"
    json.dump(tok, open(path, "w"))
    with pytest.raises(UserError, match="WordPiece tokenizer cannot be converted"):
        check()
    os.remove(path)
    with pytest.raises(UserError, match="no tokenizer.json"):
        check()


# Sentencepiece-style HF tokenizers (BPE with byte fallback), as transformers writes them from a
# tokenizer.model: Metaspace (LLaMA/Mistral), the legacy Prepend+Replace normalizer (LLaMA-2), and
# Gemma's Replace-only normalizer (no prefix space).
SPM_VARIANTS = {
    "metaspace": None,
    "legacy": ({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}, None),
    "gemma": ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, None),
}
SPM_TEXT = ("Hello wörld! 12345 naïve café — π ≈ 3.14159, 日本語 🙂 tabs\tand   spaces\n\n"
            "  def f(x): return x ** 2  # 100%\n")


def add_sentencepiece_tokenizer(folder, variant, vocab=600):
    """A sentencepiece BPE (byte fallback, a user-defined <think>) trained on the tutorial text,
    turned into tokenizer.json by transformers, with the normalizer of `variant`."""
    import sentencepiece as spm

    from tests.test_gguf_tokenizer import tutorial_text

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tutorial_text(200_000).splitlines()),
        model_prefix=os.path.join(folder, "sp"), model_type="bpe", vocab_size=vocab,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<think>"],
        minloglevel=2)
    os.replace(os.path.join(folder, "sp.model"), os.path.join(folder, "tokenizer.model"))
    transformers.LlamaTokenizer.from_pretrained(folder).save_pretrained(folder)
    os.remove(os.path.join(folder, "tokenizer.model"))  # tokenizer.json alone must be enough
    if SPM_VARIANTS[variant]:
        path = os.path.join(folder, "tokenizer.json")
        tok = json.load(open(path, encoding="utf-8"))
        tok["normalizer"], tok["pre_tokenizer"] = SPM_VARIANTS[variant]
        if variant == "gemma":
            tok["decoder"]["decoders"].pop()  # no prefix space to strip
        json.dump(tok, open(path, "w", encoding="utf-8"))
    # tokenizer.json exactly as it is (LlamaTokenizer would rebuild its pre-tokenizer)
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))


@pytest.fixture(scope="module")
def spm_exports(tmp_path_factory):
    """variant -> (HF tokenizer, exported file) for a pruned tiny llama of vocabulary 640."""
    out = {}
    for variant in SPM_VARIANTS:
        tmp = tmp_path_factory.mktemp(f"spm_{variant}")
        hf = tiny_models.make_hf_model("llama_tied", vocab_size=640, bos_token_id=1,
                                       eos_token_id=2)
        folder = tiny_models.save_hf_model(hf, tmp / "hf")
        want = add_sentencepiece_tokenizer(folder, variant)
        path = gguf_export.export_gguf(pruned_of(folder), tmp / "gguf", gguf_type="f32")
        out[variant] = want, path
    return out


def test_sentencepiece_tokenizer_metadata(spm_exports):
    want, path = spm_exports["metaspace"]
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == 640
    vocab = want.get_vocab()
    assert tokens[:len(vocab)] == sorted(vocab, key=vocab.get)
    T = gguf.TokenType
    assert types[vocab["<s>"]] == types[vocab["</s>"]] == T.CONTROL
    assert types[vocab["<think>"]] == T.USER_DEFINED
    assert types[vocab["<0x41>"]] == T.BYTE and types[vocab["\u2581the"]] == T.NORMAL
    assert types[-1] == T.UNUSED and tokens[-1] == "[PAD639]"
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    # transformers' LlamaTokenizer adds no BOS here: the file must say so (llama.cpp would add one)
    assert want("a")["input_ids"][0] != 1
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.add_bos_token"] is False
    # the first merge makes the best-scoring token; characters score below every merge
    merges = json.load(open(os.path.join(os.path.dirname(path), "..", "hf",
                                         "tokenizer.json")))["model"]["merges"]
    first = "".join(merges[0])
    assert scores[vocab[first]] == max(scores) == -1.0
    assert scores[vocab["t"]] < min(scores[vocab["".join(m)]] for m in merges)
    for variant, prefix in (("legacy", True), ("gemma", False)):
        reader = gguf.GGUFReader(spm_exports[variant][1])
        assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is prefix


@pytest.mark.parametrize("variant", sorted(SPM_VARIANTS))
def test_sentencepiece_tokenizer_gives_the_same_ids(spm_exports, variant):
    """Our reader (which honours add_space_prefix) and, for the prefix-space variants,
    transformers' GGUF loader, on unicode, digits, runs of spaces and byte-fallback text."""
    from tests.test_gguf_tokenizer import tutorial_text

    want, path = spm_exports[variant]
    text = SPM_TEXT + tutorial_text(20_000)
    ids = want(text)["input_ids"]
    assert want.convert_tokens_to_ids("<0xF0>") in ids  # the emoji's bytes
    assert gguf_tokenizer.load_gguf_tokenizer(path)(text)["input_ids"] == ids
    if variant != "gemma":  # transformers' llama GGUF tokenizer always adds the prefix space
        out, file = os.path.split(path)
        assert transformers.AutoTokenizer.from_pretrained(out, gguf_file=file)(text)["input_ids"] == ids


def test_sentencepiece_tokenizers_we_cannot_reproduce_are_refused(tmp_path):
    folder = str(tmp_path)
    add_sentencepiece_tokenizer(folder, "metaspace")
    path = os.path.join(folder, "tokenizer.json")
    tok = json.load(open(path, encoding="utf-8"))
    tok["normalizer"] = {"type": "NFKC"}
    json.dump(tok, open(path, "w", encoding="utf-8"))
    with pytest.raises(UserError, match=r"normalizer/pre-tokenizer \(NFKC \+ Metaspace\)"):
        gguf_vocab.check_tokenizer(None, folder, folder)
    tok["normalizer"] = None
    tok["pre_tokenizer"]["split"] = True
    tok["model"]["vocab"]["a\u2581b"] = len(tok["model"]["vocab"])
    json.dump(tok, open(path, "w", encoding="utf-8"))
    with pytest.raises(UserError, match="spans a word boundary"):
        gguf_vocab.check_tokenizer(None, folder, folder)
    tok["model"] = {"type": "Unigram", "vocab": [["a", -1.0]]}
    json.dump(tok, open(path, "w", encoding="utf-8"))
    with pytest.raises(UserError, match="a Unigram tokenizer cannot be converted"):
        gguf_vocab.check_tokenizer(None, folder, folder)


def test_a_failed_write_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path, "llama_tied")
    pruned = pruned_of(folder)
    calls = []

    def failing(t, arr):
        calls.append(t.name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), t.qtype)

    monkeypatch.setattr(gguf_export, "_encode", failing)
    with pytest.raises(Exception):
        gguf_export.export_gguf(pruned, tmp_path / "gguf")
    assert not os.path.exists(tmp_path / "gguf")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".gguf")]


# ----------------------------------------------------------------------------- launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """A tiny model with a tokenizer, pruned by launch.prune --export_gguf (q8_0)."""
    base = tmp_path_factory.mktemp("gguf_run")
    dense = tiny_folder(base, "llama_gqa_untied")
    out = base / "run"
    proc = _run("launch.prune", f"--model={dense}", "--mode=random", "--ratios=0.2,0.5",
                f"--out_dir={out}", "--export_gguf", "--gguf_type=q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dense, out


def test_prune_writes_a_gguf_per_output_and_resumes(gguf_run):
    dense, out = gguf_run
    manifest = json.load(open(out / "manifest.json"))
    files = {}
    for entry in manifest["outputs"]:
        assert entry["export_gguf"] == "q8_0" and entry["gguf_dir"].endswith("/gguf")
        path = gguf_export.find_gguf(str(out / entry["gguf_dir"]))
        back = gguf_format.load_gguf(path)
        assert back.config.intermediate_size == entry["kept"]
        files[path] = os.stat(path).st_mtime_ns
    # a resumed run finds every output done (same recipe) and writes nothing again
    proc = _run("launch.prune", f"--model={dense}", "--mode=random", "--ratios=0.2,0.5",
                f"--out_dir={out}", "--export_gguf", "--gguf_type=q8_0", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: os.stat(p).st_mtime_ns for p in files} == files


def test_convert_and_recover_write_gguf(gguf_run, tmp_path):
    dense, out = gguf_run
    proc = _run("launch.convert", f"--input={out}", "--ratio=0.5", f"--output={tmp_path / 'c'}",
                "--to=gguf", "--gguf_type=f32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    converted = gguf_format.load_gguf(printed["output"])
    orbax_model = sources.load_model(str(out / "ratio_0.5" / "orbax"))
    for name, arr in orbax_model.named_arrays():
        np.testing.assert_allclose(dict(converted.named_arrays())[name], arr, atol=2.5e-7)
    proc = _run("launch.recover", f"--input={out}", "--ratio=0.5", f"--out_dir={tmp_path / 'r'}",
                "--recover_steps=1", "--train_seq_len=32", "--lora_rank=4", "--pool_rows=4",
                "--train_batch=2", "--export_gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = gguf_export.find_gguf(str(tmp_path / "r" / "ratio_0.5" / "gguf"))
    recovered = sources.load_model(str(tmp_path / "r" / "ratio_0.5" / "orbax"))
    back = gguf_format.load_gguf(path)  # f16 by default
    for name, arr in recovered.named_arrays():
        np.testing.assert_allclose(dict(back.named_arrays())[name], arr, rtol=1e-3, atol=1e-3)


def test_prune_refuses_an_unexportable_model_before_training(tmp_path):
    opt = tiny_models.save_hf_model(tiny_models.make_hf_model("opt"), tmp_path / "opt")
    proc = _run("launch.prune", f"--model={opt}", "--ratios=0.2", "--episodes=50",
                f"--out_dir={tmp_path / 'run'}", "--export_gguf")
    assert proc.returncode == 2
    assert "no llama.cpp architecture" in proc.stderr and "--export_hf" in proc.stderr
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing written

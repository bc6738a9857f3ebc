"""Fuzzing the file parsers (hypothesis): safetensors headers, sharded index files and config.json.
Any input either loads or raises UserError, never another exception; a header that loads never
makes a read outside its file (every memmap is checked against the file size).

Example counts: 600 safetensors headers, 300 index files, 600 config.json dicts (1,500 in all).
Each test also checks that a real share of its examples loaded: a generator (or a loader) that
refuses everything would otherwise pass while checking nothing past the refusal.
"""
import collections
import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from prunenet_jax.errors import UserError
from prunenet_jax.formats import hf
from prunenet_jax.formats import safetensors as st_format
from prunenet_jax.formats.safetensors import SafetensorsFile
from prunenet_jax.models.config import ModelConfig

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, including the edge numbers Python's json writes (NaN, Infinity, huge ints).
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-3, 70) | st.sampled_from([2**31, 2**62, 2**64])
# A rare branch is taken on the TOP value of a draw like st.integers(0, 9): hypothesis draws the
# low end far more often than uniformly (measured: 0 of integers(0, 9) about 27% of the time,
# 0 of integers(0, 3) about 43%), so a "one in ten" taken on 0 was about one in four.


@st.composite
def entries(draw):
    """A header entry: mostly well-formed with plausible numbers, sometimes any JSON."""
    if draw(st.integers(0, 9)) == 9:
        return draw(json_values)
    entry = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8", "x"])),
             "shape": draw(st.lists(small_ints, max_size=3)),
             "data_offsets": draw(st.lists(small_ints, min_size=1, max_size=3))}
    if draw(st.booleans()):  # make size agree with the shape, as a real file would
        n = int(np.prod([max(d, 0) for d in entry["shape"]], dtype=object) or 0) * (
            {"F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1))
        begin = draw(st.integers(0, 64))
        entry["data_offsets"] = [begin, begin + n]
    if draw(st.integers(0, 5)) == 5:
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    return entry


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def laid_out_headers(draw):
    """A header as a writer lays it out: known dtypes, small shapes, tensors back to back from data
    byte 0 (sometimes with a gap), so it loads when the file holds the data (data_len decides);
    about one time in five, one offset is then moved by a byte (overlap, gap, size mismatch, -1)."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=4)):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 2), max_size=2))  # at most 16 bytes
        offset += draw(st.sampled_from([0, 0, 0, 1, 3]))
        size = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if header and draw(st.integers(0, 3)) == 3:
        offsets = header[draw(st.sampled_from(sorted(header)))]["data_offsets"]
        offsets[draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1]))
    return header


@st.composite
def headers(draw):
    """Rarely any JSON; often laid out as a writer would (most load); else entries()."""
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return draw(json_values)
    if kind <= 3:
        header = draw(laid_out_headers())
    else:
        header = draw(st.dictionaries(st.text(min_size=1, max_size=6), entries(), max_size=5))
    if draw(st.booleans()):  # mostly an object of strings (as written), about 1 in 5 any JSON
        header["__metadata__"] = draw(json_values if draw(st.integers(0, 3)) == 3 else
                                      st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    return header


TALLY = collections.Counter()  # "loaded" / "refused" examples of the property now running


def _load_or_refuse(load, path):
    """load(path), or None when it raises UserError; any other exception fails the test."""
    try:
        result = load(path)
    except UserError:
        event("refused")
        TALLY["refused"] += 1
        return None
    event("loaded")
    TALLY["loaded"] += 1
    return result


def _run_and_check_loaded_share(prop, workdir, floor: float):
    """Runs the hypothesis property `prop`, then asserts that at least `floor` of the examples it
    tried loaded rather than being refused."""
    TALLY.clear()
    prop(workdir)
    loaded, total = TALLY["loaded"], TALLY["loaded"] + TALLY["refused"]
    assert total > 0, "the property ran no examples"
    assert loaded / total >= floor, (
        f"only {loaded} of {total} examples loaded ({loaded / total:.1%} < {floor:.0%}): the "
        "generator (or the loader) refuses almost everything, so the checks on loaded files "
        "hardly run")


@st.composite
def trailers(draw):
    """What follows the header's JSON: nothing or the spaces writers pad with; about one time in
    five, 1 to 4 random bytes."""
    if draw(st.integers(0, 3)) == 3:
        return draw(st.binary(min_size=1, max_size=4))
    return draw(st.sampled_from([b"", b" ", b"   "]))


def _check_reads_stay_inside(f: SafetensorsFile, monkeypatch):
    size = os.path.getsize(f.path)
    real = np.memmap

    def memmap(path, dtype, mode, offset, shape):
        assert offset >= 0 and offset + int(np.prod(shape)) <= size, (offset, shape, size)
        return real(path, dtype=dtype, mode=mode, offset=offset, shape=shape)

    monkeypatch.setattr(st_format.np, "memmap", memmap)
    for name in f.keys():
        array = f.get(name)
        assert array.shape == f.shape(name)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@settings(max_examples=600, **SETTINGS)
@given(header=headers(), data_len=st.integers(0, 96) | st.just(96), garbage=trailers())
def _fuzz_safetensors_headers(workdir, header, data_len, garbage):
    head = json.dumps(header).encode() + garbage
    path = os.path.join(workdir, "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + bytes(range(256))[:data_len])
    loaded = _load_or_refuse(SafetensorsFile, path)
    if loaded is None:
        return
    with pytest.MonkeyPatch.context() as mp:
        _check_reads_stay_inside(loaded, mp)


def test_fuzz_safetensors_headers(workdir):
    # Measured (hypothesis seeds 0-9, 600 examples each): 30-42% loaded, 36% on average
    # (before the generators were reworked: 9%). Floor: 15%.
    _run_and_check_loaded_share(_fuzz_safetensors_headers, workdir, floor=0.15)


shard_names = (st.sampled_from(["model-1.safetensors", "model-2.safetensors"])
               | st.sampled_from(["/etc/passwd", "../model-1.safetensors", "./model-1.safetensors",
                                  "..", ".", "", "a/b", "a\\b", "nul\0", "missing.safetensors"])
               | json_values)
SHARD_OF = {"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}


@st.composite
def weight_maps(draw):
    """Tensors a, b, c (any subset), each mostly mapped to its own shard, else to any of
    shard_names (another shard, a path, a missing file, any JSON)."""
    names = draw(st.lists(st.sampled_from(sorted(SHARD_OF)), unique=True, max_size=3))
    return {n: SHARD_OF[n] if draw(st.integers(0, 2)) < 2 else draw(shard_names) for n in names}


@st.composite
def indexes(draw):
    """Mostly {"weight_map": weight_maps()}; else a weight_map of any JSON, or any JSON at all
    (these two almost never load, so they are the rare branches)."""
    kind = draw(st.integers(0, 5))
    if kind == 5:
        return draw(json_values)
    return {"weight_map": draw(json_values if kind == 4 else weight_maps())}


@settings(max_examples=300, **SETTINGS)
@given(index=indexes())
def _fuzz_index_files(workdir, index):
    folder = os.path.join(workdir, "sharded")
    os.makedirs(folder, exist_ok=True)
    for i, names in ((1, ("a", "b")), (2, ("c",))):
        st_format.write_safetensors(os.path.join(folder, f"model-{i}.safetensors"),
                                    {n: np.ones((2,), np.float32) for n in names})
    with open(os.path.join(folder, hf.SAFE_INDEX), "w") as f:
        json.dump(index, f)
    where = _load_or_refuse(hf.open_shards, folder)
    if where is None:
        return
    for name, shard in where.items():  # only files inside the folder are ever opened
        assert os.path.dirname(os.path.abspath(shard.path)) == os.path.abspath(folder)
        assert shard.get(name).shape == (2,)


def test_fuzz_index_files(workdir):
    # Measured (hypothesis seeds 0-9, 300 examples each): 36-47% loaded, 41% on average
    # (before weight_maps() and indexes(): 4%). Floor: 20%.
    _run_and_check_loaded_share(_fuzz_index_files, workdir, floor=0.20)


GOOD = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
FIELDS = sorted(GOOD) + ["head_dim", "sliding_window", "use_sliding_window", "rope_parameters",
                         "attention_bias", "mlp_bias", "max_position_embeddings"]


@st.composite
def configs(draw):
    if draw(st.integers(0, 9)) == 9:
        return draw(json_values)
    cfg = dict(GOOD, model_type=draw(st.sampled_from(["llama", "mistral", "qwen2"])))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        cfg[key] = draw(json_values | small_ints | st.sampled_from([0, -1, 1e300, float("inf")]))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=1)):
        cfg.pop(key, None)
    return cfg


@settings(max_examples=600, **SETTINGS)
@given(cfg=configs())
def _fuzz_config_json(workdir, cfg):
    folder = os.path.join(workdir, "config")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    config = _load_or_refuse(hf.load_config, folder)
    if config is None:
        return
    assert config.hidden_size >= 1 and config.num_attention_heads % config.num_key_value_heads == 0
    assert ModelConfig.from_hf(cfg) == config


def test_fuzz_config_json(workdir):
    # Measured (hypothesis seeds 0-9, 600 examples each): 19.5-25% loaded, 22% on average
    # (about the same before the rare branch moved to the top value). Floor: 10%.
    _run_and_check_loaded_share(_fuzz_config_json, workdir, floor=0.10)

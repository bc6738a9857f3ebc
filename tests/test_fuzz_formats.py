"""Fuzzing the file parsers (hypothesis): safetensors headers, sharded index files and config.json.
Any input either loads or raises UserError, never another exception; a header that loads never
makes a read outside its file (every memmap is checked against the file size).

Example counts: 600 safetensors headers, 300 index files, 600 config.json dicts (1,500 in all).
"""
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
from prunenet_jax.models.config import LlamaConfig

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, including the edge numbers Python's json writes (NaN, Infinity, huge ints).
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-3, 70) | st.sampled_from([2**31, 2**62, 2**64])


@st.composite
def entries(draw):
    """A header entry: mostly well-formed with plausible numbers, sometimes any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    entry = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8", "x"])),
             "shape": draw(st.lists(small_ints, max_size=3)),
             "data_offsets": draw(st.lists(small_ints, min_size=1, max_size=3))}
    if draw(st.booleans()):  # make size agree with the shape, as a real file would
        n = int(np.prod([max(d, 0) for d in entry["shape"]], dtype=object) or 0) * (
            {"F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1))
        begin = draw(st.integers(0, 64))
        entry["data_offsets"] = [begin, begin + n]
    if draw(st.integers(0, 5)) == 0:
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    return entry


@st.composite
def headers(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    header = draw(st.dictionaries(st.text(min_size=1, max_size=6), entries(), max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4))
                                      | json_values)
    return header


def _load_or_refuse(load, path):
    """load(path), or None when it raises UserError; any other exception fails the test."""
    try:
        result = load(path)
    except UserError:
        event("refused")
        return None
    event("loaded")
    return result


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
@given(header=headers(), data_len=st.integers(0, 96), garbage=st.binary(max_size=4))
def test_fuzz_safetensors_headers(workdir, header, data_len, garbage):
    head = json.dumps(header).encode() + garbage
    path = os.path.join(workdir, "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + bytes(range(256))[:data_len])
    loaded = _load_or_refuse(SafetensorsFile, path)
    if loaded is None:
        return
    with pytest.MonkeyPatch.context() as mp:
        _check_reads_stay_inside(loaded, mp)


shard_names = (st.sampled_from(["model-1.safetensors", "model-2.safetensors"])
               | st.sampled_from(["/etc/passwd", "../model-1.safetensors", "./model-1.safetensors",
                                  "..", ".", "", "a/b", "a\\b", "nul\0", "missing.safetensors"])
               | json_values)


@settings(max_examples=300, **SETTINGS)
@given(index=st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                                         shard_names, max_size=3)}),
    st.fixed_dictionaries({"weight_map": json_values}), json_values))
def test_fuzz_index_files(workdir, index):
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


GOOD = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
FIELDS = sorted(GOOD) + ["head_dim", "sliding_window", "use_sliding_window", "rope_parameters",
                         "attention_bias", "mlp_bias", "max_position_embeddings"]


@st.composite
def configs(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    cfg = dict(GOOD, model_type=draw(st.sampled_from(["llama", "mistral", "qwen2"])))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        cfg[key] = draw(json_values | small_ints | st.sampled_from([0, -1, 1e300, float("inf")]))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=1)):
        cfg.pop(key, None)
    return cfg


@settings(max_examples=600, **SETTINGS)
@given(cfg=configs())
def test_fuzz_config_json(workdir, cfg):
    folder = os.path.join(workdir, "config")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    config = _load_or_refuse(hf.load_config, folder)
    if config is None:
        return
    assert config.hidden_size >= 1 and config.num_attention_heads % config.num_key_value_heads == 0
    assert LlamaConfig.from_hf(cfg) == config

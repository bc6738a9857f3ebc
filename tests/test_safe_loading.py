"""Safe loading: nothing in the project unpickles an untrusted file or runs a model's own code."""
import os
import re

import pytest

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("prunenet_jax", "models", "launch")


def _source_files():
    for folder in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    yield os.path.relpath(path, ROOT), open(path).read()


def test_no_pickle_no_remote_code_in_the_library():
    files = dict(_source_files())
    assert len(files) > 20
    for name, text in files.items():
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cPickle|dill", text, re.M), name
        assert "allow_pickle=True" not in text, name
        assert not re.search(r"trust_remote_code\s*=\s*True", text), name
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (name, call.group(0))
        for call in re.finditer(r"np\.load\(([^)]*)\)", text):  # .npy/.npz can hold pickles
            assert "allow_pickle=False" in call.group(1), (name, call.group(0))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "m")
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really")  # never opened: we do not read pickles
    with pytest.raises(UserError, match="safetensors"):
        sources.load_model(str(folder))


def test_hub_downloads_take_a_revision(monkeypatch):
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        raise OSError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(UserError, match="org/model"):
        sources.load_model("org/model", revision="v1.2")
    assert calls["revision"] == "v1.2"
    # Only weights in safetensors form, configs and tokenizer files: never a pickle or code file.
    assert not any(p.endswith((".bin", ".pt", ".py", ".pkl")) for p in calls["patterns"])

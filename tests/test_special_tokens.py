"""special_tokens.py: BOS/EOS ids from generation_config.json (which wins, as in transformers'
generate), config.json, else the tokenizer; one lookup for generation, calibration and recovery."""
import json
import types

import pytest

from prunenet_jax import special_tokens
from prunenet_jax.errors import UserError
from prunenet_jax.weights import ModelWeights


def _weights(folder, config: dict, generation_config=None) -> ModelWeights:
    if generation_config is not None:
        (folder / special_tokens.GENERATION_CONFIG).write_text(json.dumps(generation_config))
    return ModelWeights(config=None, hf_config=config, globals={}, layers={}, source=str(folder),
                        tokenizer_dir=str(folder))


def _tokenizer(bos, eos):
    return types.SimpleNamespace(bos_token_id=bos, eos_token_id=eos)


def test_generation_config_ids_are_honoured(tmp_path):
    w = _weights(tmp_path, {"bos_token_id": 1, "eos_token_id": 2},
                 {"bos_token_id": 7, "eos_token_id": [9, 8, 9]})
    assert special_tokens.bos_id(w) == 7
    assert special_tokens.eos_ids(w) == [8, 9]  # generation_config's list wins over config's 2


def test_config_where_generation_config_names_none_then_the_tokenizer(tmp_path):
    w = _weights(tmp_path, {"bos_token_id": 1, "eos_token_id": [2, 3]}, {"eos_token_id": None})
    assert special_tokens.bos_id(w) == 1 and special_tokens.eos_ids(w) == [2, 3]
    asked = []
    tokenizer_fn = lambda: asked.append(1) or _tokenizer(4, 5)
    special_tokens.bos_id(w, tokenizer_fn)
    assert not asked  # the tokenizer is not loaded when a config names the token
    (tmp_path / "bare").mkdir()
    none = _weights(tmp_path / "bare", {"bos_token_id": None})  # no generation_config.json
    assert special_tokens.bos_id(none, tokenizer_fn) == 4 and special_tokens.eos_ids(none, tokenizer_fn) == [5]
    assert special_tokens.bos_id(none) is None and special_tokens.eos_ids(none) == []


def test_unreadable_generation_config_is_a_user_error(tmp_path):
    (tmp_path / special_tokens.GENERATION_CONFIG).write_text("{not json")
    w = _weights(tmp_path, {"eos_token_id": 2})
    with pytest.raises(UserError, match="generation_config.json cannot be read as JSON"):
        special_tokens.eos_ids(w)

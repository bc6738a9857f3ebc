"""orbax checkpoints of everything the project writes in JAX form.

Three kinds, each an orbax composite checkpoint with a JSON `meta` item that says what it is:
- a policy (`save_policy`/`load_policy`): P, b, r plus its shapes, seed, hyper-parameters and
  best-episode statistics;
- the training state after every episode (`TrainCheckpoints`, an orbax CheckpointManager whose
  steps are episodes done): policy, optimiser state, episode, best-so-far and the per-episode
  history, so a killed run resumes where it stopped. The RNG needs no saving: episode e's key is
  fold_in(key(seed), e), so the seed (checked on resume) and the episode index fix it;
- a sliced model (`save_model`/`load_model`/`restore_model_arrays`): every tensor under its HF
  name, the source config.json with the new width, the kept channels, and where the tokenizer
  lives; restorable onto a device mesh with shardings.

orbax writes a checkpoint under a temporary name and renames it when complete. Replacing an
existing checkpoint (`overwrite`) saves beside it and swaps, so the old one stays until the new
one is complete.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunenet_jax.files import atomic, json_files, output_folder
from prunenet_jax.errors import UserError
from prunenet_jax.models import registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.weights import ModelWeights

POLICY_KIND = "prunenet_jax.policy"
MODEL_KIND = "prunenet_jax.sliced_model"
TRAIN_KIND = "prunenet_jax.train_state"
SCORES_KIND = "prunenet_jax.channel_scores"
FORMAT_VERSION = 1
META_FIX = "the checkpoint is damaged: restore it, or write it again (rerun the launcher that made it)"


# ----------------------------------------------------------------------------- plumbing

def _options(local_only: bool) -> ocp.options.MultiprocessingOptions:
    """On multi-host runs, checkpoints written by process 0 alone (policy, sliced models) must not
    wait at barriers for the other processes."""
    if local_only and jax.process_count() > 1:
        me = jax.process_index()  # own barrier keys: other processes may be saving meanwhile
        return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                  barrier_sync_key_prefix=f"process{me}")
    return ocp.options.MultiprocessingOptions()


def _checkpointer(local_only: bool = True) -> ocp.Checkpointer:
    opts = _options(local_only)
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=opts))
    return ocp.Checkpointer(handler, multiprocessing_options=opts)


def _save(path: str, items: dict[str, Any], meta: dict, overwrite: bool) -> None:
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose "
                        "another --out_dir")
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args["meta"] = ocp.args.JsonSave(json_files.finite(meta))  # orbax would write NaN
    output_folder.check_free_space(path, _nbytes(items) + 2**16)  # + metadata
    with atomic.staged_dir(path, create=False) as tmp:  # orbax creates tmp; we swap it into path
        _checkpointer().save(tmp, args=ocp.args.Composite(**args))


def _nbytes(tree) -> int:
    """Bytes of the arrays of `tree` (no device-to-host copy)."""
    return sum(int(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes)
               for x in jax.tree.leaves(tree))


def read_meta(path: str) -> Optional[dict]:
    """The JSON `meta` item of one of our checkpoints, or None when `path` is not one. Read as
    the file orbax's JsonSave wrote (`meta/metadata`): faster than a restore, and a damaged file
    is a UserError naming it."""
    meta_file = os.path.join(path, "meta", "metadata")
    if not os.path.isfile(meta_file):
        return None
    meta = json_files.read_json(meta_file, fix=META_FIX, kind=None)
    return meta if isinstance(meta, dict) and "kind" in meta else None


def _expect_kind(path: str, kind: str, what: str, fix: str) -> dict:
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder; pass {what}")
    meta = read_meta(path)
    if meta is None or meta.get("kind") != kind:
        found = "another kind of checkpoint" if meta else "not a prunenet-jax orbax checkpoint"
        raise UserError(f"{path} is {found}; pass {what} ({fix})")
    version = meta.get("format_version", 0)
    if not _is_int(version):
        raise _bad_meta(path, f"format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer prunenet-jax (format "
                        f"{meta['format_version']}); upgrade prunenet-jax to read it")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_meta(path: str, problem: str) -> UserError:
    """A field of a checkpoint's `meta/metadata` that we never write so: the file was edited."""
    return UserError(f"{os.path.join(path, 'meta', 'metadata')}: {problem}; {META_FIX}")


def _restore(path: str, items: dict[str, Any], error=None) -> dict[str, Any]:
    """The checkpoint's `items`; a damaged one is `error(problem)` (default: a UserError naming
    `path`)."""
    args = {name: ocp.args.StandardRestore(target) for name, target in items.items()}
    try:  # orbax takes absolute paths only; a user's relative path is as good
        return _checkpointer().restore(os.path.abspath(path), args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        problem = (f"the checkpoint is damaged or incomplete ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})")
        if error is not None:
            raise error(problem) from None
        raise UserError(f"{path}: {problem}; write it again") from None


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------- policy

def save_policy(path: str, params: dict, metadata: dict, *, overwrite: bool = False) -> None:
    """Saves policy params {P (I, H), b (I,), r (I, 1)} with `metadata` (JSON-serialisable: seed,
    hyper-parameters, best-episode statistics, ...); shapes are recorded by this function."""
    params = _to_numpy(params)
    I, H = params["P"].shape
    meta = {"kind": POLICY_KIND, "format_version": FORMAT_VERSION, "intermediate_size": int(I),
            "hidden_size": int(H), **metadata}
    _save(path, {"params": params}, meta, overwrite)


def load_policy(path: str) -> tuple[dict, dict]:
    """(params as host arrays, metadata) of a policy saved by `save_policy`."""
    meta = _expect_kind(path, POLICY_KIND, "the policy/ folder of an earlier prune run",
                        "e.g. --policy=<previous --out_dir>/policy")
    I, H = meta.get("intermediate_size"), meta.get("hidden_size")
    if not (_is_int(I) and _is_int(H) and I >= 1 and H >= 1):
        raise _bad_meta(path, f"intermediate_size={I!r}, hidden_size={H!r} are not sizes")
    target = {"P": np.zeros((I, H), np.float32), "b": np.zeros((I,), np.float32),
              "r": np.zeros((I, 1), np.float32)}
    return _to_numpy(_restore(path, {"params": target})["params"]), meta


def check_policy_fits(meta: dict, config: ModelConfig, source: str, policy_path: str) -> None:
    """The policy maps an (I, H) gate matrix to I logits: it prunes only models of that shape."""
    want = (meta["intermediate_size"], meta["hidden_size"])
    have = (config.intermediate_size, config.hidden_size)
    if want != have:
        raise UserError(f"{source} has gate matrices of shape (intermediate_size, hidden_size) = "
                        f"{have} but the policy {policy_path} was trained for {want}; train a "
                        "policy on this model (omit --policy) or pass one trained on the same shapes")


# ----------------------------------------------------------------------------- training state

PARTIAL_SAVE = ".orbax-checkpoint-tmp"  # in the name of a save orbax has not finished


def remove_partial_saves(directory: str, settle_seconds: float = 0.0) -> None:
    """Removes the unfinished saves (`<n>.orbax-checkpoint-tmp*`) in `directory`; with
    `settle_seconds`, keeps looking that long for files a failed save's writer threads still
    add."""
    deadline = time.time() + settle_seconds
    while True:
        partial = [os.path.join(directory, n) for n in
                   (os.listdir(directory) if os.path.isdir(directory) else []) if PARTIAL_SAVE in n]
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        if not partial or time.time() >= deadline:
            return
        time.sleep(0.1)


class TrainCheckpoints:
    """The training state after every episode, under `directory` (orbax CheckpointManager, steps =
    episodes done, the latest two kept).

    `run_meta` describes the run (seed, hyper-parameters, model shapes); `restore` refuses a
    checkpoint of another run, so --resume cannot silently mix two configurations.
    """

    def __init__(self, directory: str, run_meta: dict):
        self.directory = os.path.abspath(directory)
        self.run_meta = {"kind": TRAIN_KIND, "format_version": FORMAT_VERSION, **run_meta}
        if jax.process_index() == 0:
            # Here, not by orbax's cleanup_tmp_directories: that runs in a thread which can
            # outlive a run failing at once (and then lists a folder the failure removed).
            remove_partial_saves(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "history", "meta"))

    def latest_episode(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, episodes_done: int, state, history: dict[str, np.ndarray]) -> None:
        """Asynchronous: returns once the arrays are copied; `wait` before relying on the files.
        A full disk or lost permission (here or from the previous save) is a WriteError."""
        output_folder.check_free_space(self.directory, _nbytes((state, history)) + 2**16)
        with atomic.write_errors(self.directory):
            self._manager.save(episodes_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.StandardSave(history),
                meta=ocp.args.JsonSave(self.run_meta)))

    def restore(self, state_template, history_template_fn) -> tuple[Any, dict, int]:
        """(state, history, episodes done) of the latest checkpoint, as host arrays shaped like
        `state_template`; `history_template_fn(episodes)` gives the history's shapes. With
        `state_template` None only the history is read (state None)."""
        step = self._manager.latest_step()
        if step is None:
            raise UserError(f"{self.directory} holds no training checkpoint to resume from; "
                            "drop --resume to start afresh")
        meta = json_files.read_json(os.path.join(self.directory, str(step), "meta", "metadata"),
                                    fix="the training checkpoint is damaged: drop --resume (with "
                                        "--overwrite) to start afresh")
        diff = sorted(k for k in set(meta) | set(self.run_meta) if meta.get(k) != self.run_meta.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {meta.get(k)!r} vs now {self.run_meta.get(k)!r}"
                               for k in diff)
            raise UserError(f"--resume: the training checkpoint in {self.directory} belongs to "
                            f"another run ({detail}); rerun with the same flags, or drop --resume "
                            "(with --overwrite) to start afresh")
        template = {"history": history_template_fn(step)}
        if state_template is not None:
            template["state"] = _to_numpy(state_template)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in template.items()}))
        state = _to_numpy(restored["state"]) if state_template is not None else None
        return state, _to_numpy(restored["history"]), step

    def wait(self) -> None:
        with atomic.write_errors(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------- channel scores

def save_scores(path: str, arrays: dict[str, np.ndarray], metadata: dict, *,
                overwrite: bool = False) -> None:
    """Saves per-channel scores {name: (L, I) float32} (method/scores.py) with `metadata` (its
    "shape" [L, I, H], the calibration, ...)."""
    meta = {"kind": SCORES_KIND, "format_version": FORMAT_VERSION, "arrays": sorted(arrays),
            **metadata}
    _save(path, {"scores": {n: np.asarray(a, np.float32) for n, a in arrays.items()}}, meta, overwrite)


class BadScores(UserError):
    """Saved scores that cannot be used, and why (`problem`): a rerun's own saved scores are
    measured again, with `problem` in a warning; `--scores` names them and the fix."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"--scores={path}: {problem}; pass the scores/ folder of an earlier "
                         "energy run of this model (<its --out_dir>/scores), or drop --scores")
        self.problem = problem


def scores_meta(path: str) -> dict:
    """The metadata of scores saved by `save_scores`, without reading the arrays: its "shape"
    [L, I, H] (integers >= 1) and the names of its "arrays" are checked."""
    meta = _expect_kind(path, SCORES_KIND, "the scores/ folder of an earlier energy run",
                        "e.g. --scores=<previous --out_dir>/scores")
    shape, arrays = meta.get("shape"), meta.get("arrays")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(_is_int(n) and 1 <= n < 2**31 for n in shape)):
        raise BadScores(path, f"its metadata's shape is {shape!r}, not [layers, "
                        "intermediate_size, hidden_size] (3 integers >= 1)")
    if not (isinstance(arrays, list) and all(isinstance(n, str) for n in arrays)):
        raise BadScores(path, f"its metadata's arrays is {arrays!r}, not a list of names")
    return meta


def load_scores(path: str, names: tuple) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of scores saved by `save_scores`; the arrays `names` must be there,
    each of shape (L, I) as the metadata says."""
    meta = scores_meta(path)
    missing = [n for n in names if n not in meta["arrays"]]
    if missing:
        raise BadScores(path, f"its metadata lists the arrays {meta['arrays']}, without "
                        f"{', '.join(missing)}")
    L, I = meta["shape"][:2]
    target = {n: np.zeros((L, I), np.float32) for n in meta["arrays"]}
    arrays = _to_numpy(_restore(path, {"scores": target},
                                error=lambda problem: BadScores(path, problem))["scores"])
    for n in names:  # orbax restores the saved shape, whatever the target's
        if arrays[n].shape != (L, I):
            raise BadScores(path, f"array {n!r} has shape {arrays[n].shape}, not (layers, "
                            f"intermediate_size) = ({L}, {I}) as its metadata says")
    return arrays, meta


# ----------------------------------------------------------------------------- sliced model

def save_model(path: str, weights: ModelWeights, metadata: dict, *, kept: Optional[np.ndarray] = None,
               overwrite: bool = False) -> None:
    """Saves every tensor of `weights` (globals and stacked layers, HF names) with the source
    config.json (already carrying the new width), `metadata` (ratio, seed, ...) and the kept
    channels (L, k) of the dense model they were sliced from."""
    dtypes = {n: np.dtype(a.dtype).name for n, a in {**weights.globals, **weights.layers}.items()}
    meta = {"kind": MODEL_KIND, "format_version": FORMAT_VERSION, "hf_config": weights.hf_config,
            "dtypes": dtypes, "source": weights.source,
            "tokenizer_dir": _abs(weights.tokenizer_dir), "gguf_file": _abs(weights.gguf_file),
            "has_kept": kept is not None, **metadata}
    items = {"globals": dict(weights.globals), "layers": dict(weights.layers)}
    if kept is not None:
        items["kept"] = {"indices": np.asarray(kept, np.int32)}
    _save(path, items, meta, overwrite)


def load_kept(path: str) -> np.ndarray:
    """The kept channels (L, k) stored with a sliced model."""
    meta = _expect_kind(path, MODEL_KIND, "a sliced-model orbax folder", "ratio_<r>/orbax")
    if not meta.get("has_kept"):
        raise UserError(f"{path} does not record its kept channels (it was converted, not pruned)")
    config = ModelConfig.from_hf(meta["hf_config"])
    target = {"indices": np.zeros((config.num_hidden_layers, config.intermediate_size), np.int32)}
    return _restore(path, {"kept": target})["kept"]["indices"]


def _abs(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


def model_shardings(shapes: dict[str, tuple], mesh: Mesh) -> dict[str, NamedSharding]:
    """A sharding for every tensor: split its first axis whose length the mesh size divides (the
    layer axis when it can), else replicate."""
    n, axis = mesh.devices.size, mesh.axis_names[0]
    out = {}
    for name, shape in shapes.items():
        dim = next((d for d, size in enumerate(shape) if size % n == 0 and size >= n), None)
        spec = P() if dim is None else P(*([None] * dim), axis)
        out[name] = NamedSharding(mesh, spec)
    return out


def _model_templates(meta: dict, path: str) -> tuple[ModelConfig, dict]:
    config = ModelConfig.from_hf(meta.get("hf_config"), source=os.path.join(path, "meta"))
    shapes = registry.expected_shapes(config)
    dtypes = meta.get("dtypes")
    try:
        dtype = {n: np.dtype(dtypes[n]) for n in shapes}
    except (KeyError, TypeError):  # not a dict, a tensor missing, not a dtype name
        raise _bad_meta(path, "its 'dtypes' does not name a dtype for every tensor") from None
    globals_ = {n: jax.ShapeDtypeStruct(shapes[n], dtype[n]) for n in registry.global_tensor_names(config)}
    layers = {n: jax.ShapeDtypeStruct(shapes[n], dtype[n]) for n in registry.layer_tensor_names(config)}
    return config, {"globals": globals_, "layers": layers}


def load_config(path: str) -> ModelConfig:
    """A sliced model checkpoint's config, without reading its tensors."""
    meta = _expect_kind(path, MODEL_KIND, "a sliced-model orbax folder", "or an HF folder")
    return ModelConfig.from_hf(meta["hf_config"], source=os.path.join(path, "meta"))


def restore_model_arrays(path: str, mesh: Optional[Mesh] = None) -> tuple[dict, dict]:
    """({"globals": {...}, "layers": {...}} as jax arrays, meta). With a mesh every tensor is
    placed by `model_shardings`, each device reading only its own slices from disk."""
    meta = _expect_kind(path, MODEL_KIND, "a sliced-model orbax folder (ratio_<r>/orbax of a "
                        "prune run)", "or an HF folder")
    _, templates = _model_templates(meta, path)
    if mesh is not None:
        for group in templates.values():
            shard = model_shardings({n: t.shape for n, t in group.items()}, mesh)
            for n, t in group.items():
                group[n] = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=shard[n])
    return _restore(path, templates), meta


def load_model(path: str, dtype=np.float32, source: Optional[str] = None) -> ModelWeights:
    """A sliced model checkpoint as host ModelWeights (like `sources.load_model`); dtype None keeps
    the saved dtypes."""
    meta = _expect_kind(path, MODEL_KIND, "a sliced-model orbax folder", "or an HF folder")
    config, templates = _model_templates(meta, path)
    host = {g: {n: np.zeros(t.shape, t.dtype) for n, t in group.items()}
            for g, group in templates.items()}
    arrays = _restore(path, host)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype, copy=False))
    weights = ModelWeights(
        config=config, hf_config=meta["hf_config"],
        globals={n: cast(np.asarray(a)) for n, a in arrays["globals"].items()},
        layers={n: cast(np.asarray(a)) for n, a in arrays["layers"].items()},
        source=source or path, tokenizer_dir=meta.get("tokenizer_dir"),
        gguf_file=meta.get("gguf_file"))
    weights.check_shapes()
    return weights


def model_card_fields(meta: dict) -> dict:
    """The fields of a sliced-model checkpoint that an HF model card reports."""
    keys = ("source", "ratio", "kept", "params_before", "params_after", "seed",
            "policy_fingerprint", "mode", "guard", "selection", "calibration", "command")
    return {k: meta[k] for k in keys if meta.get(k) is not None}


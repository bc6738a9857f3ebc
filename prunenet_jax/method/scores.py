"""Channel scores of the `energy` mode and the super-channel guard (SPEC.md, "Beyond the paper").

energy_j = E[h_j^2] * ||down[:, j]||^2: the mean energy channel j adds to the layer's output (h:
the input of down_proj, measured on calibration tokens). `energy` keeps the k largest per layer.

Guard: a few channels carry enormous output energy; dropping one ruins the model. They are outliers
of log(||gate_j|| * ||up_j||) within their layer (weights only): never drop channel j when that
exceeds the layer's median by more than 6 robust z-scores (MAD x 1.4826). For `energy` the guard
also covers channels whose log peak |h_j| is such an outlier.

`obtain` gives a model's scores: from `--scores`, from the run folder of an earlier run with the
same calibration (no forward pass), or by calibrating (method/calibration.py) and measuring
(method/statistics.py); new scores are saved (orbax) in the run folder.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

import numpy as np

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.formats import orbax
from prunenet_jax.method import calibration as calibration_lib
from prunenet_jax.method import statistics
from prunenet_jax.models import decoder, registry
from prunenet_jax.weights import ModelWeights

log = logging.getLogger(__name__)

GUARD_Z = 6.0
MAD_TO_SIGMA = 1.4826
SCORES = "scores"  # the folder in a run folder
ARRAYS = ("energy", "mean_sq", "peak")  # what `save` writes and `load` needs


def robust_outliers(x: np.ndarray, z: float = GUARD_Z) -> np.ndarray:
    """(L, I) bool: x[l, j] above its layer's median by more than z robust z-scores (MAD x 1.4826).
    A layer whose MAD is 0 has no outliers."""
    x = np.asarray(x, np.float64)
    median = np.median(x, axis=1, keepdims=True)
    sigma = MAD_TO_SIGMA * np.median(np.abs(x - median), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(sigma > 0, (x - median) / np.where(sigma > 0, sigma, 1.0), 0.0)
    return score > z


def _log(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, np.float64), np.finfo(np.float64).tiny))


def weight_guard(weights: ModelWeights) -> np.ndarray:
    """(L, I) bool: the weight-only super channels: outliers of log of the product of channel j's
    row norms in the row-sliced matrices (||gate_j|| * ||up_j||; ||fc1_j|| for a plain MLP)."""
    norms = 1.0
    for name in registry.row_sliced(weights.config):
        if weights.layers[name].ndim == 3:  # weights, not biases
            norms = norms * np.linalg.norm(weights.layers[name], axis=2)
    return robust_outliers(_log(norms))


def energy(mean_sq: np.ndarray, down: np.ndarray) -> np.ndarray:
    """(L, I) E[h_j^2] * ||down[:, j]||^2 for down (L, H, I) (HF layout: column j is channel j's)."""
    col_sq = np.einsum("lhi,lhi->li", down, down, dtype=np.float64)
    return (np.asarray(mean_sq, np.float64) * col_sq).astype(np.float32)


@dataclasses.dataclass
class Scores:
    energy: np.ndarray  # (L, I)
    mean_sq: np.ndarray  # (L, I) E[h_j^2]
    peak: np.ndarray  # (L, I) max |h_j|
    meta: dict  # tokens, calibration, model, shape
    # the calibration tokens when measured in this process (not saved): `compensated` walks the
    # same tokens, and re-sampling a self-generated pool would cost minutes
    tokens: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.meta["shape"])

    def guard(self, weights: ModelWeights) -> np.ndarray:
        """The guard of `energy`: weight-only super channels and peak-activation outliers."""
        return weight_guard(weights) | robust_outliers(_log(self.peak))


def _shape(weights: ModelWeights) -> list:
    c = weights.config
    return [c.num_hidden_layers, c.intermediate_size, c.hidden_size]


def check_fits(meta: dict, weights_shape, model: str, path: str) -> None:
    """Scores rank the channels of a model of one (L, I, H)."""
    if list(meta["shape"]) != list(weights_shape):
        L, I, H = meta["shape"]
        raise UserError(f"--scores={path} was measured on a model of {L} layers, I={I}, H={H}, but "
                        f"{model} has {weights_shape[0]} layers, I={weights_shape[1]}, "
                        f"H={weights_shape[2]}; pass the scores of this model, or drop --scores")


def measure(weights: ModelWeights, cal: calibration_lib.Calibration, tokenizer_fn,
            folder: Optional[str] = None, batch_size: int = 8, mesh=None) -> Scores:
    """Calibrate (tokens reused from `folder` when saved there) and measure the statistics."""
    t0 = time.time()
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    tokens, reused = calibration_lib.tokens_for(weights, cal, tokenizer_fn, folder, model)
    t1 = time.time()
    stats = statistics.collect(model, tokens, batch_size=batch_size, mesh=mesh)
    t2 = time.time()
    log.info("calibration: %d x %d tokens (%s, %.1f s); statistics %.1f s", *tokens.shape,
             "reused" if reused else cal.source, t1 - t0, t2 - t1)
    meta = {"calibration": cal.describe(), "model": weights.source, "shape": _shape(weights),
            "tokens": stats.tokens, "tokens_reused": reused,
            "seconds": {"calibration": round(t1 - t0, 3), "statistics": round(t2 - t1, 3)}}
    return Scores(energy(stats.mean_sq, weights.layers[registry.COLUMN_SLICED]), stats.mean_sq,
                  stats.peak, meta, tokens=tokens)


def obtain(weights: ModelWeights, cal: calibration_lib.Calibration, tokenizer_fn, *,
           scores_path: Optional[str] = None, folder: Optional[str] = None,
           mesh=None) -> tuple[Scores, bool]:
    """(scores, computed): from `scores_path`, else from `<folder>/scores` when an earlier run
    measured them with the same calibration on the same model (and they are valid: else a
    warning says why), else measured now (and saved to `<folder>/scores`). `computed` is False
    when no forward pass ran."""
    if scores_path:
        check_fits(orbax.scores_meta(scores_path), _shape(weights), weights.source, scores_path)
        return load(scores_path), False
    saved = os.path.join(folder, SCORES) if folder else None
    if saved and os.path.isdir(saved):
        scores = _reusable(saved, weights, cal)
        if scores is not None:
            return scores, False
    scores = measure(weights, cal, tokenizer_fn, folder, mesh=mesh)
    if saved:
        save(saved, scores)
    return scores, True


def _reusable(saved: str, weights: ModelWeights, cal: calibration_lib.Calibration) -> Optional[Scores]:
    """The scores an earlier run saved in `saved` when they were measured with the same
    calibration on the same model; None when not, or (with a warning) when they are not valid."""
    try:
        meta = orbax.scores_meta(saved)
        if (meta.get("calibration") != cal.describe() or meta.get("model") != weights.source
                or meta["shape"] != _shape(weights)):
            return None  # another recipe: measured again, as asked
        return load(saved)
    except orbax.BadScores as e:
        reason = e.problem
    except UserError as e:  # not ours, or damaged
        reason = str(e)
    progress.warning(f"the saved scores {saved} are not used ({reason}); measuring them again")
    return None


def save(path: str, scores: Scores) -> None:
    arrays = {"energy": scores.energy, "mean_sq": scores.mean_sq, "peak": scores.peak}
    orbax.save_scores(path, arrays, scores.meta, overwrite=True)


def load(path: str) -> Scores:
    """Scores saved by `save`, checked (`invalid`): an orbax.BadScores naming `path` when they
    cannot rank channels."""
    arrays, meta = orbax.load_scores(path, ARRAYS)
    problem = invalid(arrays)
    if problem:
        raise orbax.BadScores(path, problem)
    return Scores(arrays["energy"], arrays["mean_sq"], arrays["peak"], meta)


def invalid(arrays: dict[str, np.ndarray]) -> Optional[str]:
    """Why saved (L, I) scores cannot rank channels, or None: a value NaN, Inf or negative (they
    are energies and magnitudes), or one layer's energy the same for all its channels."""
    for name in ARRAYS:
        bad = int(np.count_nonzero(~np.isfinite(arrays[name])))
        if bad:
            return f"{name} has {bad} NaN or Inf values"
        negative = int(np.count_nonzero(arrays[name] < 0))
        if negative:
            return f"{name} has {negative} negative values"
    energy = arrays["energy"]
    flat = [l for l in range(energy.shape[0]) if energy.shape[1] > 1 and np.ptp(energy[l]) == 0]
    if flat:
        return (f"energy is {energy[flat[0], 0]:g} for every channel of layer {flat[0]}, so it "
                "cannot rank them")
    return None

"""One REINFORCE episode of the shared policy (docs/algorithm.md, "Learning"), jitted, all layers
at once (streaming.py: the same episode for a stack too big for the device; trainer.py: the loop):
  1. z_l = policy logits; u ~ U(0,1); S_l = k rows drawn w/o replacement proportionally to
     keep_l = sigmoid(logit(u) + z_l)                                   (all layers, old params)
  2. R_l = 1 / KS(s_l, s'(W_l[S_l])), R^_l = gamma^l R_l                 (all layers in parallel)
  3. loss_l = -R^_l * sum_{i in S_l} log keep'_l[i]  (+ KL term if enabled), keep' recomputed
     with fresh noise u' (default) or with u (`reuse_noise=True`);
     schedule "layer": one AdamW step per layer, in layer order (loss_l evaluated with the
     params after l steps), as the paper's code; "episode": one AdamW step on sum_l loss_l with
     global grad-norm clipping at `clip_norm`, as `efficient-pruners`.
  4. best-episode bookkeeping: the params that SAMPLED the episode with the highest total reward.

Layout: every per-layer array has a leading layer axis (possibly padded, see sharding.py) that may
be split over a 1-D mesh; the per-layer work runs under `jax.shard_map`, so each device handles
only its own layers, and the only communication is a psum of an (H + 2)-vector per optimiser step.
The policy and optimiser state are replicated. Padded layers (index >= num_layers) get zero reward
and loss and never trigger an optimiser step.

The loss depends on the params only through (v, c) = (P^T r, b.r) (z = W v + c), so gradients are
taken w.r.t. z per layer and pulled back with W^T and the VJP of (v, c): exact, and the layer's W
never leaves its device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from prunenet_jax.method import policy as policy_lib
from prunenet_jax.method import sampling
from prunenet_jax.method import sharding
from prunenet_jax.method import spectral
from prunenet_jax.errors import Diverged, UserError

SCHEDULES = ("layer", "episode")
_HIGHEST = lax.Precision.HIGHEST
_LOG_HALF = math.log(0.5)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of policy training; the defaults are the reference's.

    ratio: compression ratio the policy is trained at (k = int((1 - ratio) * I) rows kept).
    """
    ratio: float
    gamma: float = 0.99
    schedule: str = "layer"
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # torch.optim.AdamW's default (optax's default is 1e-4)
    clip_norm: float = 1.0  # "episode" schedule only (the reference's per-layer clip is a no-op)
    use_kl: bool = False
    reuse_noise: bool = False  # loss pass reuses the sampling noise u instead of fresh u'
    sv_method: str = spectral.DEFAULT_SV_METHOD

    def __post_init__(self):
        if not 0.0 <= float(self.ratio) < 1.0:
            raise UserError(f"compression ratio {self.ratio} is out of range; use a ratio in "
                            "[0, 1), e.g. 0.3")
        if self.schedule not in SCHEDULES:
            raise UserError(f"update schedule {self.schedule!r} is unknown; use one of "
                            f"{', '.join(SCHEDULES)}")
        if self.sv_method not in spectral.SV_METHODS:
            raise UserError(f"singular value method {self.sv_method!r} is unknown; use one of "
                            f"{', '.join(spectral.SV_METHODS)}")


class TrainState(NamedTuple):
    params: policy_lib.Params
    opt_state: Any
    episode: jax.Array  # int32: episodes done
    best_reward: jax.Array  # float32: highest total reward so far (-inf before the first)
    best_params: policy_lib.Params  # the params that sampled the best episode
    best_episode: jax.Array  # int32: its index (-1 before the first)


class EpisodeMetrics(NamedTuple):
    """Per-layer arrays have the (padded) leading layer axis; cut with `sharding.unpad`."""
    indices: jax.Array  # (L, k) int32, sorted kept rows
    ks: jax.Array  # (L,) KS statistic
    rewards: jax.Array  # (L,) R_l = 1/KS_l (0 for padded layers)
    discounted_rewards: jax.Array  # (L,) gamma^l R_l
    losses: jax.Array  # (L,) loss_l as optimised (layer schedule: at that layer's step)
    total_reward: jax.Array  # () sum of R_l over real layers


# ----------------------------------------------------------------------------- optimiser, state

def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with PyTorch's semantics: p <- p - lr * (m^/(sqrt(v^) + eps) + wd * p).

    (optax.adamw = scale_by_adam -> add_decayed_weights -> scale_by_learning_rate, which is the
    same update as torch.optim.AdamW's p *= 1 - lr*wd; p -= lr * m^/(sqrt(v^) + eps).)
    """
    adamw = optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.schedule == "episode":
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def init_state(params: policy_lib.Params, cfg: TrainConfig) -> TrainState:
    params = jax.tree.map(jnp.asarray, policy_lib.check_params(params))
    return TrainState(
        params=params,
        opt_state=make_optimizer(cfg).init(params),
        episode=jnp.zeros((), jnp.int32),
        best_reward=jnp.full((), -jnp.inf, jnp.float32),
        best_params=jax.tree.map(lambda x: jnp.array(x, copy=True), params),
        best_episode=jnp.full((), -1, jnp.int32),
    )


# ----------------------------------------------------------------------------- per-layer pieces

def kl_term(z: jax.Array) -> jax.Array:
    """The reference's optional KL term for one layer, from logits (alpha = sigmoid(z)):
    sum_i [ -(1 - alpha_i) log alpha_i - alpha_i log(1 - alpha_i) + log 0.5 ]."""
    alpha = jax.nn.sigmoid(z)
    return jnp.sum(-(1.0 - alpha) * jax.nn.log_sigmoid(z)
                   - alpha * jax.nn.log_sigmoid(-z) + _LOG_HALF)


def layer_loss(z: jax.Array, indices: jax.Array, u_loss: jax.Array, disc_reward: jax.Array,
               use_kl: bool = False) -> jax.Array:
    """loss_l = -R^_l * sum_{i in S_l} log keep'_l[i] (+ KL), with keep' = sigmoid(logit(u') + z).

    z, u_loss: (I,); indices: (k,); disc_reward: (). log keep' is a log_sigmoid of the keep logit,
    finite even for saturated logits.
    """
    logp = sampling.log_keep(z, u_loss)
    loss = -disc_reward * jnp.sum(jnp.take(logp, indices))
    if use_kl:
        loss = loss + kl_term(z)
    return loss


def discount_factors(layer_ids: jax.Array, gamma: float) -> jax.Array:
    """gamma^l for global layer indices l."""
    return jnp.asarray(gamma, jnp.float32) ** layer_ids.astype(jnp.float32)


# ----------------------------------------------------------------------------- collectives

def _local_layer_ids(num_local: int, axis: Optional[str], first=0) -> jax.Array:
    """Global indices of this device's layers: its block of the layer axis (without a mesh: the
    layers from `first` on, e.g. a streamed chunk)."""
    ids = jnp.arange(num_local, dtype=jnp.int32)
    if axis is None:
        return ids + first
    return lax.axis_index(axis).astype(jnp.int32) * num_local + ids


def _psum(x, axis: Optional[str]):
    return x if axis is None else lax.psum(x, axis)


def _param_grads(params, dv, dc):
    """Pull (dL/dv, dL/dc) back to dL/d{P, b, r} through (v, c) = (P^T r, b.r)."""
    _, vjp = jax.vjp(policy_lib.projection, params)
    (grads,) = vjp((dv, dc))
    return grads


def _masked(cond, new, old):
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


# ----------------------------------------------------------------------------- update schedules

def layer_schedule(cfg, opt, num_layers, axis, params, opt_state, W, S, u_loss, disc, first=0):
    """One optimiser step per layer, in global layer order (lax.scan). Inputs are this device's
    block of layers; at step l the device that owns layer l computes the pulled-back gradient
    (H + 1 numbers + the loss) and a psum hands it to every device, which all apply the same
    update to the replicated params. Without a mesh, `first` is the global index of W's first
    layer (a streamed chunk). Returns (params, opt_state, local losses)."""
    L_loc = W.shape[0]
    n_dev = 1 if axis is None else lax.axis_size(axis)
    me = 0 if axis is None else lax.axis_index(axis)

    def step(carry, l):
        params, opt_state = carry
        owner, local = l // L_loc, l % L_loc
        mine = owner == me
        Wl = lax.dynamic_index_in_dim(W, local, keepdims=False)
        Sl = lax.dynamic_index_in_dim(S, local, keepdims=False)
        ul = lax.dynamic_index_in_dim(u_loss, local, keepdims=False)
        Rl = lax.dynamic_index_in_dim(disc, local, keepdims=False)
        v, c = policy_lib.projection(params)
        z = policy_lib.logits_from_projection(Wl, v, c)
        loss, g = jax.value_and_grad(layer_loss)(z, Sl, ul, Rl, cfg.use_kl)
        dv = jnp.matmul(g, Wl, precision=_HIGHEST)  # W^T g
        dc = jnp.sum(g)
        dv, dc, loss = _psum(jax.tree.map(lambda x: jnp.where(mine, x, 0), (dv, dc, loss)), axis)
        grads = _param_grads(params, dv, dc)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        valid = first + l < num_layers  # padded layers: no step (AdamW would still decay/move params)
        params, opt_state = _masked(valid, (new_params, new_opt_state), (params, opt_state))
        return (params, opt_state), jnp.where(valid, loss, 0.0)

    (params, opt_state), losses = lax.scan(step, (params, opt_state),
                                           jnp.arange(L_loc * n_dev, dtype=jnp.int32))
    local_losses = lax.dynamic_slice_in_dim(losses, me * L_loc, L_loc)
    return params, opt_state, local_losses


def _layer_logits(params, W):
    """z_l = W_l v + c for every layer (L, I), one layer at a time: a bf16 stack is upcast to
    fp32 a layer at a time, never whole."""
    v, c = policy_lib.projection(params)
    return lax.map(lambda w: policy_lib.logits_from_projection(w, v, c), W)


def episode_grads(cfg, valid, axis, params, W, S, u_loss, disc):
    """(dL/dv, dL/dc, per-layer losses) of sum_l loss_l over the (valid) layers of W."""
    z = _layer_logits(params, W)  # (L_loc, I)
    losses, g = jax.vmap(jax.value_and_grad(layer_loss), in_axes=(0, 0, 0, 0, None))(
        z, S, u_loss, disc, cfg.use_kl)
    losses = jnp.where(valid, losses, 0.0)
    g = jnp.where(valid[:, None], g, 0.0)
    dv = lax.map(lambda a: jnp.matmul(a[0], a[1], precision=_HIGHEST), (g, W))  # W_l^T g_l
    dv = _psum(jnp.sum(dv, axis=0), axis)
    dc = _psum(jnp.sum(g), axis)
    return dv, dc, losses


def episode_step(opt, params, opt_state, dv, dc):
    updates, opt_state = opt.update(_param_grads(params, dv, dc), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _episode_schedule(cfg, opt, valid, axis, params, opt_state, W, S, u_loss, disc):
    """One optimiser step on sum_l loss_l (the optimiser chain clips the global grad norm)."""
    dv, dc, losses = episode_grads(cfg, valid, axis, params, W, S, u_loss, disc)
    params, opt_state = episode_step(opt, params, opt_state, dv, dc)
    return params, opt_state, losses


def _update_local(cfg, opt, num_layers, axis, params, opt_state, W, ref_sv, S, u_loss,
                  grams=None):
    """Rewards of the given actions and the policy update, on this device's block of layers.
    grams: (L, H, H) W_l^T W_l (see `layer_grams`) or None (kept rows' Grams computed directly)."""
    ids = _local_layer_ids(W.shape[0], axis)
    valid = ids < num_layers
    ks, rewards = spectral.layer_rewards(W, ref_sv, S, cfg.sv_method, grams)
    rewards = jnp.where(valid, rewards, 0.0)
    disc = rewards * discount_factors(ids, cfg.gamma)
    total = _psum(jnp.sum(rewards), axis)
    if cfg.schedule == "layer":
        params, opt_state, losses = layer_schedule(cfg, opt, num_layers, axis, params,
                                                    opt_state, W, S, u_loss, disc)
    else:
        params, opt_state, losses = _episode_schedule(cfg, opt, valid, axis, params, opt_state,
                                                      W, S, u_loss, disc)
    metrics = EpisodeMetrics(indices=S, ks=ks, rewards=rewards, discounted_rewards=disc,
                             losses=losses, total_reward=total)
    return params, opt_state, metrics


def sample_local(cfg, axis, params, W, key, first=0):
    """Actions and loss-pass noise for this device's layers: (S, u_loss)."""
    L_loc, I, _ = W.shape
    k = sampling.num_kept(I, cfg.ratio)
    ids = _local_layer_ids(L_loc, axis, first)
    k_u, k_gumbel, k_u_loss = jax.random.split(key, 3)
    z = _layer_logits(params, W)
    u = sampling.uniform_noise(k_u, L_loc, I, ids)
    S = sampling.sample_indices_from_logits(k_gumbel, sampling.keep_logits(z, u), k, ids)
    u_loss = u if cfg.reuse_noise else sampling.uniform_noise(k_u_loss, L_loc, I, ids)
    return S, u_loss


_METRIC_SPECS = EpisodeMetrics(*(P(sharding.LAYER_AXIS),) * 5, total_reward=P())


def _distribute(fn: Callable, mesh: Optional[Mesh], in_specs, out_specs) -> Callable:
    """fn(axis, *args) run as is (mesh None) or per device under shard_map over the layer axis."""
    if mesh is None:
        return functools.partial(fn, None)
    return jax.shard_map(functools.partial(fn, sharding.LAYER_AXIS), mesh=mesh,
                         in_specs=in_specs, out_specs=out_specs)


def _with_grams(args: tuple, specs: tuple, grams) -> tuple[tuple, tuple]:
    """Appends the optional (L, H, H) Grams (split over the layer axis) to a step's arguments."""
    if grams is None:
        return args, specs
    return args + (grams,), specs + (P(sharding.LAYER_AXIS),)


def _num_layers(num_layers, total):
    return total if num_layers is None else int(num_layers)


# ----------------------------------------------------------------------------- public entry points

def make_update_fn(cfg: TrainConfig, *, num_layers: Optional[int] = None,
                   mesh: Optional[Mesh] = None) -> Callable:
    """Jitted `(params, opt_state, W, ref_sv, indices, u_loss[, grams]) -> (params, opt_state,
    metrics)`.

    The lower level of an episode with the actions supplied from outside: indices (L, k) (sorted
    kept rows, e.g. exported from the PyTorch reference) and the loss-pass noise u' (L, I) in
    (0, 1). W (L, I, H), ref_sv (L, m); the leading axis may be padded past `num_layers`.
    opt_state must come from `make_optimizer(cfg).init(params)` (or a TrainState). `grams`
    (optional): `layer_grams(W)`, which lets the rewards downdate the full Grams.
    """
    opt = make_optimizer(cfg)
    lay = P(sharding.LAYER_AXIS)

    def update(params, opt_state, W, ref_sv, indices, u_loss, grams=None):
        nl = _num_layers(num_layers, W.shape[0])
        body = lambda axis, *a: _update_local(cfg, opt, nl, axis, *a)
        args, specs = _with_grams((params, opt_state, W, ref_sv, indices.astype(jnp.int32),
                                   u_loss), (P(), P(), lay, lay, lay, lay), grams)
        return _distribute(body, mesh, specs, (P(), P(), _METRIC_SPECS))(*args)

    return jax.jit(update)


def update_from_actions(params, opt_state, W, ref_sv, indices, u_loss, cfg: TrainConfig, *,
                        num_layers: Optional[int] = None, mesh: Optional[Mesh] = None):
    """`make_update_fn(cfg, ...)(params, opt_state, W, ref_sv, indices, u_loss)`, compiled once
    per (cfg, num_layers, mesh)."""
    return _cached_update_fn(cfg, num_layers, mesh)(params, opt_state, W, ref_sv, indices, u_loss)


@functools.lru_cache(maxsize=32)
def _cached_update_fn(cfg, num_layers, mesh):
    return make_update_fn(cfg, num_layers=num_layers, mesh=mesh)


def make_episode_fn(cfg: TrainConfig, *, num_layers: Optional[int] = None,
                    mesh: Optional[Mesh] = None) -> Callable:
    """Jitted `(state, W, ref_sv, key[, grams]) -> (new_state, EpisodeMetrics)`: one whole episode.

    W: (L, I, H) gate matrices in their stored dtype (fp32 or bf16/fp16: spectra and logits are
    computed in fp32), ref_sv: (L, min(I, H)) their singular values (see
    `reference_singular_values`), grams (optional): `layer_grams(W)` (L, H, H), with which the
    kept rows' Grams are downdated where that is less work (`spectral.uses_downdate`); L may be padded past `num_layers` (default: L) so that it
    divides the mesh size. With `mesh`, W/ref_sv are expected split over its layer axis
    (`sharding.place_stacked`) and the state replicated. Layer l's randomness is derived from
    `key` and l alone, so the result does not depend on the number of devices.
    """
    opt = make_optimizer(cfg)
    lay = P(sharding.LAYER_AXIS)

    def episode(state: TrainState, W, ref_sv, key, grams=None):
        nl = _num_layers(num_layers, W.shape[0])

        def body(axis, params, opt_state, W, ref_sv, key, grams=None):
            S, u_loss = sample_local(cfg, axis, params, W, key)
            return _update_local(cfg, opt, nl, axis, params, opt_state, W, ref_sv, S, u_loss,
                                 grams)

        args, specs = _with_grams((state.params, state.opt_state, W, ref_sv, key),
                                  (P(), P(), lay, lay, P()), grams)
        params, opt_state, metrics = _distribute(body, mesh, specs,
                                                 (P(), P(), _METRIC_SPECS))(*args)
        return advance(state, params, opt_state, metrics.total_reward), metrics

    return jax.jit(episode)


def advance(state: TrainState, params, opt_state, total_reward) -> TrainState:
    """The state after an episode: new params, and the best-episode bookkeeping."""
    # A non-finite episode (or one sampled by non-finite params) is never the best.
    better = (total_reward > state.best_reward) & jnp.isfinite(total_reward) & all_finite(state.params)
    return TrainState(
        params=params,
        opt_state=opt_state,
        episode=state.episode + 1,
        best_reward=jnp.where(better, total_reward, state.best_reward),
        best_params=_masked(better, state.params, state.best_params),
        best_episode=jnp.where(better, state.episode, state.best_episode),
    )


def all_finite(tree) -> jax.Array:
    """() bool: every element of every array of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


all_finite_fn = jax.jit(all_finite)


def check_finite_episode(episode: int, metrics: "EpisodeMetrics", params, cfg: TrainConfig) -> None:
    """Stops training when an episode's losses or rewards, or the params after its update (a
    non-finite gradient makes them non-finite), are NaN or Inf: what follows would be garbage."""
    bad = [f"the {f}" for f in ("losses", "rewards") if not np.isfinite(getattr(metrics, f)).all()]
    if not bool(sharding.to_host(all_finite_fn(params))):
        bad.append("the updated policy (a non-finite gradient)")
    if bad:
        raise Diverged(f"training became non-finite in episode {episode}: {' and '.join(bad)} "
                        f"hold NaN or Inf, at learning rate {cfg.learning_rate}; lower --lr, or "
                        "check that the model's gate weights are of a sane size")


def reference_singular_values(W, *, mesh: Optional[Mesh] = None,
                              method: str = spectral.DEFAULT_SV_METHOD,
                              grams: Optional[jax.Array] = None) -> jax.Array:
    """Singular values of every layer's gate matrix, (L, I, H) -> (L, min(I, H)), computed where
    each layer lives (under shard_map when a mesh is given), one layer at a time. With `grams`
    (`layer_grams(W)`) they are the Grams' eigenvalues when W's spectrum comes from W^T W."""
    L, I, H = W.shape
    if grams is not None and I >= H and spectral.resolve_method(I, H, method) == "gram":
        return _cached_sv_fn(mesh, method)(grams)
    return _cached_sv_fn(mesh, method, from_gram=False)(W)


def layer_grams(W, *, mesh: Optional[Mesh] = None) -> jax.Array:
    """W_l^T W_l of every layer (L, I, H) -> (L, H, H) fp32, where each layer lives."""
    return _cached_gram_fn(mesh)(W)


@functools.lru_cache(maxsize=8)
def _cached_sv_fn(mesh, method, from_gram=True):
    lay = P(sharding.LAYER_AXIS)
    one = spectral.sv_from_gram if from_gram else lambda w: spectral.singular_values(w, method)
    fn = _distribute(lambda axis, x: lax.map(one, x), mesh, (lay,), lay)
    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _cached_gram_fn(mesh):
    lay = P(sharding.LAYER_AXIS)
    return jax.jit(_distribute(lambda axis, w: spectral.layer_grams(w), mesh, (lay,), lay))


@functools.lru_cache(maxsize=32)
def cached_episode_fn(cfg, num_layers, mesh):
    return make_episode_fn(cfg, num_layers=num_layers, mesh=mesh)

"""Instrumentation of the reference (efficient-pruners 0.1.0) by wrapping the torch / scipy /
package functions it calls, so that its own code path runs unchanged and we only observe it.

Runs inside the reference venv. Used by export_fixture.py (and usable for diagnostics).

What is wrapped (all restored by Capture.close()):
  * torch.rand                       -> the uniform noise u drawn by SparsityPredictor.forward
                                        (torch.distributions.Uniform.sample -> rsample -> torch.rand)
                                        and by SparsityPredictor.__init__ (row_sparsities)
  * torch.multinomial                -> probabilities passed in, k, indices returned (unsorted)
  * SparsityPredictor.forward        -> its input, alpha (policy.alpha), keep_probs, and z
                                        (z re-evaluated with the same modules/autocast state,
                                        no RNG consumed)
  * efficient_pruners.core.create_sparsity_predictor -> initial policy parameters
  * scipy.stats.ks_2samp             -> reference and pruned singular values, KS statistic
  * efficient_pruners.core.calculate_reward / discount_rewards -> rewards
  * torch.amp.GradScaler.scale / step / update -> each layer's loss, the loss scale, found_inf
  * torch.nn.utils.clip_grad_norm_   -> (scaled) grads before clipping, returned norm, after
  * global optimizer step pre/post hooks -> grads seen by AdamW.step, parameters after it
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Dict, List

import numpy as np
import scipy.stats
import torch

import efficient_pruners.core as ep_core
from efficient_pruners.models.sparsity_predictor import SparsityPredictor


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().clone().numpy()


def _params(policy: torch.nn.Module) -> Dict[str, np.ndarray]:
    return {
        "P": _np(policy.proj_intermediate.weight.float()),
        "b": _np(policy.proj_intermediate.bias.float()),
        "r": _np(policy.row_sparsities.float()),
    }


def _grads(policy: torch.nn.Module) -> Dict[str, np.ndarray]:
    out = {}
    for name, p in (("P", policy.proj_intermediate.weight), ("b", policy.proj_intermediate.bias),
                    ("r", policy.row_sparsities)):
        out[name] = None if p.grad is None else _np(p.grad.float())
    return out


class Capture:
    """Records everything per episode; `episodes` is a list of dicts."""

    def __init__(self) -> None:
        self.episodes: List[Dict[str, Any]] = []
        self.init_params: Dict[str, np.ndarray] | None = None
        self.policy: torch.nn.Module | None = None
        self.optimizer_defaults: Dict[str, Any] | None = None
        self.phase = "sample"
        self.compress_calls: List[Dict[str, Any]] = []
        self._in_forward = False
        self._last_rand: torch.Tensor | None = None
        self._undo: List[Any] = []
        self._hooks: List[Any] = []
        self._new_episode()
        self._install()

    # ------------------------------------------------------------------ bookkeeping
    def _new_episode(self) -> None:
        self.cur: Dict[str, Any] = defaultdict(list)
        self.phase = "sample"

    def _set(self, obj, name, new):
        old = getattr(obj, name)
        setattr(obj, name, new)
        self._undo.append((obj, name, old))
        return old

    def close(self) -> None:
        for obj, name, old in reversed(self._undo):
            setattr(obj, name, old)
        self._undo.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def target(self) -> Dict[str, Any]:
        """Where forward/multinomial records go: the episode, or a compress() call."""
        return self.cur

    # ------------------------------------------------------------------ wrappers
    def _install(self) -> None:
        cap = self

        orig_rand = torch.rand

        def rand(*args, **kwargs):
            out = orig_rand(*args, **kwargs)
            if cap._in_forward:
                cap._last_rand = out.detach().clone()
            return out

        self._set(torch, "rand", rand)

        orig_forward = SparsityPredictor.forward

        def forward(policy, weight_matrix):
            cap._in_forward = True
            cap._last_rand = None
            try:
                keep = orig_forward(policy, weight_matrix)
            finally:
                cap._in_forward = False
            with torch.no_grad():  # same modules, same autocast state; consumes no RNG
                z = (policy.proj_intermediate(weight_matrix) @ policy.row_sparsities)[:, 0]
            rec = cap.target()
            ph = cap.phase
            rec[f"{ph}_W"].append(_np(weight_matrix.float()))
            rec[f"{ph}_u"].append(None if cap._last_rand is None else _np(cap._last_rand[:, 0]))
            rec[f"{ph}_z"].append(_np(z.float()))
            rec[f"{ph}_alpha"].append(_np(policy.alpha.float()))
            rec[f"{ph}_keep"].append(_np(keep.float()))
            rec.setdefault("dtypes", {})
            rec["dtypes"].update({f"{ph}_z": str(z.dtype), f"{ph}_alpha": str(policy.alpha.dtype),
                                  f"{ph}_keep": str(keep.dtype),
                                  f"{ph}_u": None if cap._last_rand is None else str(cap._last_rand.dtype),
                                  "autocast_enabled": bool(torch.is_autocast_enabled("cpu")
                                                           if weight_matrix.device.type == "cpu"
                                                           else torch.is_autocast_enabled()),
                                  "grad_enabled_" + ph: bool(torch.is_grad_enabled())})
            return keep

        self._set(SparsityPredictor, "forward", forward)

        orig_multinomial = torch.multinomial

        def multinomial(inp, num_samples, *args, **kwargs):
            out = orig_multinomial(inp, num_samples, *args, **kwargs)
            rec = cap.target()
            rec["multinomial_probs"].append(_np(inp.float()))
            rec["idx_raw"].append(_np(out))
            rec.setdefault("dtypes", {})["multinomial_input"] = str(inp.dtype)
            rec["multinomial_kwargs"] = {"num_samples": int(num_samples), "args": [repr(a) for a in args],
                                         **{k: repr(v) for k, v in kwargs.items()}}
            return out

        self._set(torch, "multinomial", multinomial)

        orig_create = ep_core.create_sparsity_predictor

        def create_sparsity_predictor(*args, **kwargs):
            pol = orig_create(*args, **kwargs)
            cap.policy = pol
            cap.init_params = _params(pol)
            return pol

        self._set(ep_core, "create_sparsity_predictor", create_sparsity_predictor)

        orig_ks = scipy.stats.ks_2samp

        def ks_2samp(a, b, *args, **kwargs):
            res = orig_ks(a, b, *args, **kwargs)
            cap.cur["sv_ref"].append(np.asarray(a).copy())
            cap.cur["sv_new"].append(np.asarray(b).copy())
            cap.cur["ks"].append(float(res.statistic))
            cap.cur["ks_pvalue"].append(float(res.pvalue))
            return res

        self._set(scipy.stats, "ks_2samp", ks_2samp)

        orig_reward = ep_core.calculate_reward

        def calculate_reward(reference_sv, compressed_weight):
            r = orig_reward(reference_sv, compressed_weight)
            cap.cur["reward"].append(float(r))
            cap.cur["pruned_W"].append(_np(compressed_weight.float()))
            return r

        self._set(ep_core, "calculate_reward", calculate_reward)

        orig_discount = ep_core.discount_rewards

        def discount_rewards(rewards, gamma=0.99):
            d = orig_discount(rewards, gamma)
            cap.cur["discounted"] = np.asarray(d, dtype=np.float64).copy()
            cap.cur["gamma"] = float(gamma)
            cap.phase = "loss"
            return d

        self._set(ep_core, "discount_rewards", discount_rewards)

        Scaler = torch.amp.GradScaler
        orig_scale = Scaler.scale

        def scale(self_, outputs):
            cap.cur["loss"].append(float(outputs.detach().double().item()))
            cap.cur.setdefault("dtypes", {})["loss"] = str(outputs.dtype)
            cap.cur["scale_at_backward"].append(float(self_.get_scale()) if self_.is_enabled() else 1.0)
            cap.cur["scaler_enabled"] = bool(self_.is_enabled())
            return orig_scale(self_, outputs)

        self._set(Scaler, "scale", scale)

        orig_step = Scaler.step

        def step(self_, optimizer, *args, **kwargs):
            cap.cur["scale_before_step"] = float(self_.get_scale()) if self_.is_enabled() else 1.0
            cap.cur["step_called"] = False
            cap.optimizer = optimizer
            out = orig_step(self_, optimizer, *args, **kwargs)
            found = 0.0
            if self_.is_enabled():
                st = self_._per_optimizer_states[id(optimizer)]
                found = float(sum(v.item() for v in st["found_inf_per_device"].values()))
            cap.cur["found_inf"] = found
            return out

        self._set(Scaler, "step", step)

        orig_update = Scaler.update

        def update(self_, *args, **kwargs):
            out = orig_update(self_, *args, **kwargs)
            cap.cur["scale_after_update"] = float(self_.get_scale()) if self_.is_enabled() else 1.0
            return out

        self._set(Scaler, "update", update)

        orig_clip = torch.nn.utils.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            if cap.policy is not None:
                cap.cur["grad_preclip"] = _grads(cap.policy)
            norm = orig_clip(parameters, max_norm, *args, **kwargs)
            cap.cur["clip_max_norm"] = float(max_norm)
            cap.cur["clip_total_norm"] = float(norm)
            if cap.policy is not None:
                cap.cur["grad_postclip"] = _grads(cap.policy)
            return norm

        self._set(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)

        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)

        def pre_hook(optimizer, args, kwargs):
            if cap.policy is None:
                return
            cap.cur["step_called"] = True
            cap.cur["grad_at_step"] = _grads(cap.policy)
            cap.optimizer_defaults = {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in optimizer.defaults.items()
                                      if isinstance(v, (int, float, bool, tuple, type(None), str))}
            cap.optimizer_class = type(optimizer).__name__

        def post_hook(optimizer, args, kwargs):
            if cap.policy is None:
                return
            cap.cur["params_after_step"] = _params(cap.policy)

        self._hooks.append(register_optimizer_step_pre_hook(pre_hook))
        self._hooks.append(register_optimizer_step_post_hook(post_hook))

        # An episode ends at the optimizer's zero_grad() after scaler.update() in fit().
        orig_zero = torch.optim.Optimizer.zero_grad

        def zero_grad(self_, *args, **kwargs):
            out = orig_zero(self_, *args, **kwargs)
            if cap.policy is not None and cap.phase == "loss":
                cap.cur["params_end_of_episode"] = _params(cap.policy)
                cap.episodes.append(dict(cap.cur))
                cap._new_episode()
            return out

        self._set(torch.optim.Optimizer, "zero_grad", zero_grad)

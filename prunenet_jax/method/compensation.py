"""Compensation-aware channel removal for one MLP (issue 26's core; not yet a `--mode`).

The MLP's output is down @ h, with h the I intermediate channels. Keeping only the channels S and
re-fitting the kept down-projection columns V so that V h_S stays close to down @ h in the mean
square over the calibration tokens is a least-squares problem whose statistics are the second
moment G = E[h h^T] (I x I):

    loss(S, V) = E ||down h - V h_S||^2
    V*(S)      = down G[:, S] (G[S, S] + ridge I)^-1                    (`compensated_down`)
    loss(S)    = tr(down G down^T) - tr(V* G[S, :] down^T)             (`compensated_loss`, ridge 0)

`greedy_removal` removes channels one at a time, each time the one whose removal (with the other
kept columns re-fitted) raises the loss least: the structured optimal-brain-surgeon step. With
P = (G[S, S] + ridge I)^-1 and V the current fit, removing channel j raises the loss by
||V[:, j]||^2 / P[j, j], after which V -= V[:, j] P[j, :] / P[j, j] and P loses row and column j
by the same rank-one downdate. Cost per removal O(I (H + I)); for k removals O(k I (H + I)).
Float64 on the host: the downdates lose precision in float32 after thousands of steps.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def ridge_of(G: np.ndarray, relative: float) -> float:
    """A ridge relative to the mean diagonal of G (channels' scales differ by orders)."""
    return float(relative * np.mean(np.diag(G)))


def compensated_down(G: np.ndarray, down: np.ndarray, kept: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """The least-squares kept columns V (H x |kept|) for the kept channels."""
    kept = np.asarray(kept)
    G = np.asarray(G, np.float64)
    A = G[np.ix_(kept, kept)] + ridge * np.eye(len(kept))
    B = np.asarray(down, np.float64) @ G[:, kept]  # H x |kept|
    return np.linalg.solve(A, B.T).T


def compensated_loss(G: np.ndarray, down: np.ndarray, kept: np.ndarray, V: np.ndarray = None) -> float:
    """E ||down h - V h_kept||^2 from the second moment (V: the least-squares fit if not given)."""
    kept = np.asarray(kept)
    G = np.asarray(G, np.float64)
    down = np.asarray(down, np.float64)
    if V is None:
        V = compensated_down(G, down, kept)
    D = np.zeros_like(down)
    D[:, kept] = V
    R = down - D
    return float(np.sum((R @ G) * R))  # one matrix product (einsum would loop)


def greedy_removal(G: np.ndarray, down: np.ndarray, num_remove: int, ridge: float = 0.0,
                   block: int = 1, protected: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removal order, kept channels sorted, their re-fitted down columns H x kept).

    `protected` (I bool): channels removed only once every other one is (the guard).

    `block` > 1 removes the `block` cheapest channels at once (each costed as if removed alone)
    with one rank-`block` downdate: V -= V[:, J] P[J, J]^-1 P[J, :], the same for P. About
    `block` times fewer O(I^2) steps, which makes I = 11,008 (7B) affordable; `block` = 1 is the
    exact greedy. Ties go to the lowest channel index, so the order is deterministic."""
    G = np.asarray(G, np.float64)
    down = np.asarray(down, np.float64)
    size = G.shape[0]
    if not 0 <= num_remove < size:
        raise ValueError(f"num_remove={num_remove} must be in [0, {size})")
    if block < 1:
        raise ValueError(f"block={block} must be at least 1")
    P = np.linalg.inv(G + ridge * np.eye(size))
    # V = down G P; with no ridge V = down exactly (G P = I), which the formula keeps to rounding
    V = down @ (G @ P) if ridge else down.copy()
    alive = np.ones(size, bool)
    order = []
    while len(order) < num_remove:
        diag = np.diag(P)
        cost = np.where(alive, np.einsum("hi,hi->i", V, V) / np.where(alive, diag, 1.0), np.inf)
        if protected is not None:  # after every unprotected one, before the removed ones
            cost = np.where(protected & alive, np.finfo(np.float64).max, cost)
        J = np.argsort(cost, kind="stable")[:min(block, num_remove - len(order))]
        step = np.linalg.solve(P[np.ix_(J, J)], P[J])  # P[J, J]^-1 P[J, :]
        V -= V[:, J] @ step
        P -= P[:, J] @ step
        order.extend(J.tolist())
        alive[J] = False
        V[:, J] = 0.0
        P[J, :] = 0.0
        P[:, J] = 0.0
    kept = np.flatnonzero(alive)
    return np.asarray(order), kept, V[:, kept]

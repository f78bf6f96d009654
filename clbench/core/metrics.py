"""Continual-learning metrics from the accuracy matrix R, defined once.

R has shape (T+1, T): row 0 is the model before any training, row i the model
after training task i (1-based), column j the score on task j (accuracy, or
1 - error/error_at_init for regression streams). In code, column j is index
j-1. Definitions: GEM (Lopez-Paz & Ranzato, NeurIPS 2017) for ACC, BWT, FWT;
Riemannian Walk (Chaudhry et al., ECCV 2018) for ``forgetting`` and
Avalanche's definition (Lomonaco et al. 2021) for ``forgetting_last``; Hiratani
(NeurIPS 2024) for two-task transfer and retention.
"""
from __future__ import annotations

import numpy as np

from clbench.core.errors import ClbenchError

#: The scalar metrics :func:`summary` reports (what a suite may rank by); ``transfer`` and ``retention`` only
#: for two-task streams.
METRICS = ("acc", "bwt", "fwt", "forgetting", "forgetting_last", "transfer", "retention")
#: Metrics where a smaller value is better (forgetting is a loss of accuracy); every other metric is a score.
LOWER_IS_BETTER = frozenset({"forgetting", "forgetting_last"})


def direction(metric: str) -> str:
    """``"minimize"`` for a metric in LOWER_IS_BETTER, else ``"maximize"``: the one place tuning (Optuna's study
    direction), ranking and plots learn which way a metric improves."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def higher_is_better(metric: str) -> bool:
    """True when a larger value of ``metric`` is better (see :func:`direction`)."""
    return direction(metric) == "maximize"


def _as_matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1:
        raise ClbenchError(f"R must have shape (T+1, T), got {R.shape}")
    return R


def average_accuracy(R) -> np.ndarray:
    """ACC_i = mean_{j<=i} R[i,j] for i = 1..T (a length-T vector)."""
    R = _as_matrix(R)
    T = R.shape[1]
    return np.array([R[i, :i].mean() for i in range(1, T + 1)])


def acc(R) -> float:
    """Final average accuracy ACC_T."""
    return float(average_accuracy(R)[-1])


def bwt(R) -> float:
    """Backward transfer: mean_{j<T} (R[T,j] - R[j,j]); NaN for one task."""
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean([R[T, j - 1] - R[j, j - 1] for j in range(1, T)]))


def fwt(R) -> float:
    """Forward transfer: mean_{j>1} (R[j-1,j] - R[0,j]); NaN for one task."""
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean([R[j - 1, j - 1] - R[0, j - 1] for j in range(2, T + 1)]))


def forgetting_matrix(R) -> np.ndarray:
    """F[i,j] = max_{j<=l<i} R[l,j] - R[i,j] for j < i; NaN elsewhere. Shape (T+1, T)."""
    R = _as_matrix(R)
    T = R.shape[1]
    F = np.full_like(R, np.nan)
    for i in range(2, T + 1):
        for j in range(1, i):
            F[i, j - 1] = R[j:i, j - 1].max() - R[i, j - 1]
    return F


def forgetting(R) -> float:
    """Final forgetting: mean_{j<T} F[T,j]; NaN for one task."""
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean(forgetting_matrix(R)[T, : T - 1]))


def forgetting_last(R) -> float:
    """Forgetting as Avalanche reports it: mean_{j<T} (R[j,j] - R[T,j]), the drop from just after learning
    task j (not from the best earlier score, as ``forgetting``); equals -BWT. NaN for one task."""
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean([R[j, j - 1] - R[T, j - 1] for j in range(1, T)]))


def transfer_matrix(R) -> np.ndarray:
    """X[i,j] = R[i,j] - R[0,j] for j > i (what training up to task i gives task j); NaN elsewhere."""
    R = _as_matrix(R)
    T = R.shape[1]
    X = np.full_like(R, np.nan)
    for i in range(T + 1):
        for j in range(i + 1, T + 1):
            X[i, j - 1] = R[i, j - 1] - R[0, j - 1]
    return X


def transfer_retention(R) -> tuple[float, float]:
    """Hiratani's two-task quantities from normalised scores.

    transfer = 1 - eps_2(after task 1) = R[1,2]; retention = 1 - eps_1(after task 2) = R[2,1].
    """
    R = _as_matrix(R)
    if R.shape[1] < 2:
        raise ClbenchError("transfer and retention need at least two tasks")
    return float(R[1, 1]), float(R[2, 0])


def summary(R) -> dict[str, float]:
    """ACC, BWT, FWT, both forgettings; plus transfer and retention for two-task streams."""
    R = _as_matrix(R)
    out = {"acc": acc(R), "bwt": bwt(R), "fwt": fwt(R), "forgetting": forgetting(R),
           "forgetting_last": forgetting_last(R)}
    if R.shape[1] == 2:
        out["transfer"], out["retention"] = transfer_retention(R)
    return out

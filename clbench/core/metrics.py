"""Continual-learning metrics from the accuracy matrix R, defined once.

R has shape (T+1, T): row 0 is the model before any training, row i the model
after training task i (1-based), column j the score on task j (accuracy, or
1 - error/error_at_init for regression streams). In code, column j is index
j-1. Definitions: GEM (Lopez-Paz & Ranzato, NeurIPS 2017) for ACC, BWT, FWT;
Riemannian Walk (Chaudhry et al., ECCV 2018) for ``forgetting`` and
Avalanche's definition (Lomonaco et al. 2021) for ``forgetting_last``; Hiratani
(NeurIPS 2024) for two-task transfer and retention. The second half holds the metrics of continual
evaluation curves (min-ACC, WC-ACC, WF^w, WP^w, the stability gap; De Lange et al., ICLR 2023).
"""
from __future__ import annotations

import numpy as np

from clbench.core.errors import ClbenchError

#: The scalar metrics :func:`summary` reports (what a suite may rank by); ``transfer`` and ``retention`` only
#: for two-task streams.
METRICS = ("acc", "bwt", "fwt", "forgetting", "forgetting_last", "transfer", "retention", "min_acc", "wc_acc")
#: Metrics where a smaller value is better (forgetting is a loss of accuracy); every other metric is a score.
LOWER_IS_BETTER = frozenset({"forgetting", "forgetting_last"})
FINAL_ROW = frozenset({"acc"})  # read only R's last row (and row 0, which regression scores divide by): a run
                                # scored by one of them may skip the rows between (clbench.run final_only=True)


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


# --- continual evaluation ---------------------------------------------------------------------------------------
# Metrics of the curves that ``run(eval_every=K)`` records (clbench.core.continual): ``step`` (n,) the global
# training step of each evaluation, ``score`` (n, T) the score of task j at it (NaN where not evaluated), and
# ``boundaries`` (T,) the step at which task j starts; task j's training ends at boundaries[j+1] (the
# evaluation at that step is its end-of-task score). Definitions: De Lange, van de Ven & Tuytelaars,
# "Continual evaluation for lifelong learning: identifying the stability gap" (ICLR 2023), Sec. 3, and the
# authors' code (github.com/Mattdl/ContinualEvaluation, src/eval/continual_eval_metrics.py).

def _curves(step, score, boundaries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    step = np.asarray(step, dtype=float)
    score = np.asarray(score, dtype=float)
    boundaries = np.asarray(boundaries, dtype=float)
    if score.ndim != 2 or score.shape[0] != len(step) or boundaries.shape != (score.shape[1],):
        raise ClbenchError(f"continual curves need step (n,), score (n, T) and boundaries (T,); got {step.shape}, "
                           f"{score.shape} and {boundaries.shape}")
    if np.any(np.diff(step) < 0) or np.any(np.diff(boundaries) < 0):
        raise ClbenchError("continual curves: steps and boundaries must be in training order (non-decreasing)")
    return step, score, boundaries


def _series(step, score, boundaries, j: int) -> np.ndarray:
    """Task j's scores from the start of its training on (the evaluations at steps >= boundaries[j])."""
    keep = (step >= boundaries[j]) & ~np.isnan(score[:, j])
    return score[keep, j]


def min_acc(step, score, boundaries) -> float:
    """min-ACC_T = 1/(T-1) sum_{j<T} min_{t > n_j} A_j(t): for each earlier task its lowest score at any evaluation
    after its training ended (step n_j = boundaries[j+1]), averaged; NaN for one task."""
    step, score, boundaries = _curves(step, score, boundaries)
    T = score.shape[1]
    if T < 2:
        return float("nan")
    lows = []
    for j in range(T - 1):
        after = score[(step > boundaries[j + 1]) & ~np.isnan(score[:, j]), j]
        lows.append(after.min() if len(after) else np.nan)
    return float(np.mean(lows))


def wc_acc(step, score, boundaries) -> float:
    """Worst-case accuracy WC-ACC_T = (1/T) A_T(last evaluation) + (1 - 1/T) min-ACC_T: the current task's
    score at the end and the earlier tasks' worst-case scores, weighted as in a plain average."""
    step, score, boundaries = _curves(step, score, boundaries)
    T = score.shape[1]
    current = score[-1, T - 1]
    return float(current) if T == 1 else float(current / T + (1 - 1 / T) * min_acc(step, score, boundaries))


def _windowed(step, score, boundaries, w: int, sign: float) -> float:
    step, score, boundaries = _curves(step, score, boundaries)
    if not isinstance(w, int) or w < 2:
        raise ClbenchError(f"the window w must be a whole number >= 2 evaluations, got {w!r}")
    per_task = []
    for j in range(score.shape[1]):
        a = _series(step, score, boundaries, j)
        best = 0.0
        for lag in range(1, min(w, len(a))):  # every pair p < q within w consecutive evaluations
            best = max(best, float(np.max(sign * (a[:-lag] - a[lag:]))))
        per_task.append(best)
    return float(np.mean(per_task))


def windowed_forgetting(step, score, boundaries, w: int = 10) -> float:
    """WF^w = 1/T sum_j max_{p<q<p+w} (A_j(p) - A_j(q)), clipped at 0: each task's largest drop within w consecutive
    evaluations of it (from the start of its training on), averaged over tasks."""
    return _windowed(step, score, boundaries, w, 1.0)


def windowed_plasticity(step, score, boundaries, w: int = 10) -> float:
    """WP^w = 1/T sum_j max_{p<q<p+w} (A_j(q) - A_j(p)), clipped at 0: each task's largest rise within w consecutive
    evaluations of it, averaged over tasks. (The authors' code skips a window start lower than an earlier one,
    which is right for drops only; this is the formula of the paper.)"""
    return _windowed(step, score, boundaries, w, -1.0)


def stability_gaps(step, score, boundaries) -> np.ndarray:
    """G[k, j] for the start of task k (k >= 1, 0-based) and each old task j < k: task j's score just before the
    boundary (the last evaluation at a step <= boundaries[k]) minus its minimum while task k trains (steps in
    (boundaries[k], boundaries[k+1]]); NaN elsewhere. Positive = a drop; shape (T, T)."""
    step, score, boundaries = _curves(step, score, boundaries)
    T = score.shape[1]
    G = np.full((T, T), np.nan)
    for k in range(1, T):
        end = boundaries[k + 1] if k + 1 < T else np.inf
        during = (step > boundaries[k]) & (step <= end)
        for j in range(k):
            before = score[(step <= boundaries[k]) & ~np.isnan(score[:, j]), j]
            low = score[during & ~np.isnan(score[:, j]), j]
            if len(before) and len(low):
                G[k, j] = before[-1] - low.min()
    return G


def continual_summary(curves: dict, w: int = 10) -> dict[str, float]:
    """min_acc, wc_acc, wf{w}, wp{w} and stability_gap (the mean of :func:`stability_gaps`, NaN for one task)
    from a Result's ``curves``."""
    args = (curves["step"], curves["score"], curves["boundaries"])
    G = stability_gaps(*args)
    return {"min_acc": min_acc(*args), "wc_acc": wc_acc(*args), f"wf{w}": windowed_forgetting(*args, w=w),
            f"wp{w}": windowed_plasticity(*args, w=w),
            "stability_gap": float(np.nanmean(G)) if np.any(~np.isnan(G)) else float("nan")}

"""Reproduction of Hiratani, "Disentangling and mitigating the impact of task similarity for continual
learning" (NeurIPS 2024): the teacher-student figures with the authors' settings, simulation beside theory.

Settings from the authors' scripts (github nhiratani/transfer_retention_model, teacher-student/lst_*.py):
Ns = 30, Nx = 3000, Ny = 10, two tasks, W from 0, full-batch gradient descent on the expected loss
W <- W + 1e-3 (B - W X) X^T, 100 epochs (vanilla, random gating) or 500 (adaptive and plasticity
gating, L2, Fisher); Bernoulli(alpha) gates on the inputs without rescaling; scores 1 - error (raw).

The teachers are clbench's ``teacher-student`` stream, seed by seed. Training runs many seeds at once in
closed latent form: every update adds E X^T for an (Nx x Ns) input matrix X, so W = sum_k V_k U_k^T over the
few matrices U_k that occur, and gradient descent runs on the (Ny x Ns) coefficients V_k through the Gram
matrices U_k^T X: the same iterates as the engine (the test checks them against ``clbench.run`` with the
finetune, gating, l2 and ewc strategies) at a fraction of the cost. The diagonal Fisher is the one
exception: its metric diag(A A^T) leaves that span, so its panel uses the converged minimiser of the same
objective (Woodbury), which 500 epochs reach to within 0.5 % at gamma <= 0.9.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clbench.core.errors import ClbenchError
from clbench.streams.teacher_student import theory

NS, NX, NY, ETA = 30, 3000, 10, 1e-3
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 12, "grid": [0.0, 0.5, 1.0], "alphas": [0.2, 0.6, 1.0], "gammas": [0.2, 0.6, 1.0],
              "input_dim": NX, "mnist": None},
    "full": {"seeds": 32, "grid": [round(0.1 * i, 1) for i in range(11)], "alphas": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
             "gammas": [0.2, 0.4, 0.6, 0.8, 1.0], "input_dim": NX,
             "mnist": {"train": 1000, "test": 1000, "epochs": 30, "lr": 0.5, "rho_a": [0.0, 1.0], "rho_b": [0.0, 1.0]}},
}


# --- theory (the paper's closed forms; L2 from the authors' lst_wn_theory.py) -------------------------------
def vanilla_theory(rho_a, rho_b):
    """(transfer, retention) of :func:`clbench.streams.teacher_student.theory`, on arrays."""
    closed = theory(np.asarray(rho_a, float), np.asarray(rho_b, float))
    return closed["transfer"], closed["retention"]


def gating_theory(rho_a, rho_b, alpha):
    """Random activity gating with active fraction alpha acts as rho_a -> alpha rho_a."""
    return vanilla_theory(alpha * np.asarray(rho_a, float), rho_b)


def gating_average(alpha: float) -> tuple[float, float]:
    """Over uniform rho_a, rho_b: <transfer> = alpha/2 - alpha^2/3, <retention> = 1 - (alpha^4/5 - alpha^3/4 + alpha^2/3)."""
    return alpha / 2 - alpha**2 / 3, 1 - (alpha**4 / 5 - alpha**3 / 4 + alpha**2 / 3)


def l2_theory(rho_a, rho_b, gamma):
    """L2 with task 1 also pulled to W = 0, strength (Nx/Ns)(1/gamma - 1) (authors' lst_wn_theory.py)."""
    a, b, g = np.asarray(rho_a, float), np.asarray(rho_b, float), gamma
    transfer = g * a * (2 * b - g * a)
    err = (1 - g) ** 2 - 2 * g * a * (b - g * (a + b) + g * g * a) + g * g * a * a * (1 - 2 * g * a * b + g * g * a * a)
    return transfer, 1 - err


# --- teachers and the latent-form simulator ----------------------------------------------------------------
def base_teachers(seeds, input_dim: int = NX) -> dict[str, torch.Tensor]:
    """Per seed, clbench's teacher-student stream at rho_a = rho_b = 0: A1, B1 and the fresh draws A~, B~ (float64).

    The stream mixes A2 = rho_a A1 + sqrt(1 - rho_a^2) A~ (and B2 alike) from the same draws whatever rho,
    so ``mix`` gives its teachers at any similarity (up to the float32 rounding of the stored matrices).
    """
    from clbench import make_stream

    mats: dict[str, list] = {"A1": [], "Af": [], "B1": [], "Bf": []}
    for s in seeds:
        stream = make_stream("teacher-student", rho_a=0.0, rho_b=0.0, input_dim=input_dim, seed=int(s))
        for name, task in zip("1f", stream.tasks):
            mats["A" + name].append(task.metadata["A"].double())
            mats["B" + name].append(task.metadata["B"].double())
    return {k: torch.stack(v) for k, v in mats.items()}


def mix(base: dict[str, torch.Tensor], rho_a, rho_b) -> dict[str, torch.Tensor]:
    """The two tasks' teachers at similarity (rho_a, rho_b): scalars or one value per seed."""
    S = base["A1"].shape[0]
    a = torch.as_tensor(np.broadcast_to(np.asarray(rho_a, float), (S,)).copy())[:, None, None]
    b = torch.as_tensor(np.broadcast_to(np.asarray(rho_b, float), (S,)).copy())[:, None, None]
    return {"A1": base["A1"], "B1": base["B1"], "A2": a * base["A1"] + (1 - a**2).clamp(min=0).sqrt() * base["Af"],
            "B2": b * base["B1"] + (1 - b**2).clamp(min=0).sqrt() * base["Bf"]}


def bernoulli_gates(seeds, size: int, alpha: float, salt: int) -> torch.Tensor:
    """One Bernoulli(alpha) 0/1 vector per seed (the authors' gates), float64 (S, size)."""
    return torch.stack([(torch.rand(size, generator=torch.Generator().manual_seed(int(s) * 7919 + salt),
                                    dtype=torch.float64) < alpha).double() for s in seeds])


class _Latent:
    """W = sum_k V[k] U[k]^T over named input matrices U (S, Nx, Ns); Gram matrices cached."""

    def __init__(self, mats: dict[str, torch.Tensor], ny: int) -> None:
        self.mats, self.grams, self.V = mats, {}, {}
        self.ny = ny

    def gram(self, k: str, x: str) -> torch.Tensor:
        if (k, x) not in self.grams:
            self.grams[(k, x)] = self.mats[k].transpose(1, 2) @ self.mats[x]
        return self.grams[(k, x)]

    def out(self, x: str, V: dict | None = None) -> torch.Tensor:
        V = self.V if V is None else V
        total = 0.0
        for k, v in V.items():
            total = total + v @ self.gram(k, x)
        return total

    def error(self, x: str, B: torch.Tensor) -> torch.Tensor:
        return ((B - self.out(x)) ** 2).sum((1, 2)) / self.ny

    def train(self, x: str, u: str, B: torch.Tensor, epochs: int, lr: float = ETA,
              penalty: Callable[[], dict] | None = None) -> None:
        """Gradient descent: W <- W + lr [(B - W X) U^T - penalty gradient]; input X = mats[x], update along U = mats[u]."""
        self.V.setdefault(u, torch.zeros_like(B))
        for _ in range(epochs):
            step = {u: B - self.out(x)}
            for k, g in (penalty() if penalty else {}).items():
                step[k] = step.get(k, 0.0) - g
            for k, g in step.items():
                self.V[k] = self.V.get(k, 0.0) + lr * g

    def snapshot(self) -> dict:
        return {k: v.clone() for k, v in self.V.items()}


def simulate(method: str, T: dict[str, torch.Tensor], seeds, *, epochs: int, alpha: float = 1.0, gamma: float = 1.0,
             gates: tuple[torch.Tensor, torch.Tensor] | None = None, lr: float = ETA) -> dict[str, Any]:
    """Two-task runs for every seed at once; returns ``raw`` (S, 3, 2) errors ||B - W X||^2/Ny and ``rho_g``.

    method: vanilla | gating | adaptive | plasticity | l2 | ewc-full (task 1 plain) | ewc-diag (converged).
    ``gates``: the two (S, Nx) gates or plasticity masks (else Bernoulli(alpha), as the authors).
    """
    A1, A2, B1, B2 = T["A1"], T["A2"], T["B1"], T["B2"]
    S, nx, ns = A1.shape
    ny = B1.shape[1]
    raw = torch.zeros(S, 3, 2, dtype=torch.float64)
    raw[:, 0, 0], raw[:, 0, 1] = (B1**2).sum((1, 2)) / ny, (B2**2).sum((1, 2)) / ny
    rho_g = torch.zeros(S, dtype=torch.float64)
    if method == "ewc-diag":
        return {"raw": _diag_converged(T, gamma, raw), "rho_g": rho_g}
    if method in ("gating", "adaptive", "plasticity"):
        g1 = gates[0] if gates else bernoulli_gates(seeds, nx, alpha, 1)
        fresh = gates[1] if gates else bernoulli_gates(seeds, nx, alpha, 2)
    mats = {"A1": A1, "A2": A2}
    if method in ("gating", "adaptive"):
        mats.update(X1=g1[:, :, None] * A1, P2=g1[:, :, None] * A2)
        x1 = u1 = "X1"
    elif method == "plasticity":
        mats.update(U1=g1[:, :, None] * A1, U2=fresh[:, :, None] * A2)
        x1, u1 = "A1", "U1"
    elif method in ("vanilla", "l2", "ewc-full"):
        x1 = u1 = "A1"
    else:
        raise ClbenchError(f"unknown method {method!r}")
    net = _Latent(mats, ny)
    lam = (nx / ns) * (1 / gamma - 1) if method == "l2" else (1 / gamma - 1)
    if method == "l2":  # pulled to W = 0 during task 1 (lst_wn.py)
        net.train(x1, u1, B1, epochs, lr, lambda: {k: lam * v for k, v in net.V.items()})
    else:
        net.train(x1, u1, B1, epochs, lr)
    raw[:, 1, 0] = net.error(x1, B1)
    x2 = u2 = "A2"
    if method in ("gating", "adaptive"):
        probe = net.error("P2", B2)  # the old gate on the new task
        rho_g = (raw[:, 0, 1] - probe).clamp(0, 1)  # lst_acg.py: error of W = 0 minus error with the old gate
        g2 = fresh
        if method == "adaptive" and not gates:
            keep = torch.stack([torch.rand(nx, generator=torch.Generator().manual_seed(int(s) * 7919 + 3),
                                           dtype=torch.float64) for s in seeds]) < rho_g[:, None]
            g2 = torch.where(keep, g1, fresh)
        net.mats["X2"] = g2[:, :, None] * A2
        x2 = u2 = "X2"
    elif method == "plasticity":
        u2 = "U2"
    raw[:, 1, 1] = net.error(x2, B2)
    anchor = net.snapshot()
    if method == "l2":
        net.train(x2, u2, B2, epochs, lr, lambda: {k: lam * (v - anchor.get(k, 0.0)) for k, v in net.V.items()})
    elif method == "ewc-full":  # lambda_c (W - W1) A1 A1^T (lst_cwn.py)
        net.train(x2, u2, B2, epochs, lr,
                  lambda: {"A1": lam * net.out("A1", {k: v - anchor.get(k, 0.0) for k, v in net.V.items()})})
    else:
        net.train(x2, u2, B2, epochs, lr)
    raw[:, 2, 0], raw[:, 2, 1] = net.error(x1, B1), net.error(x2, B2)
    return {"raw": raw, "rho_g": rho_g}


def _diag_converged(T: dict[str, torch.Tensor], gamma: float, raw: torch.Tensor) -> torch.Tensor:
    """Minimisers of ||B - W A||^2 + lam (W - Wa) D (W - Wa)^T, D = diag(A1 A1^T), lam = (Nx/Ns)(1/gamma - 1):
    task 1 towards 0 (clbench ewc-diag anchor_initial), task 2 towards W1, by Woodbury with the diagonal D."""
    A1, A2, B1, B2 = T["A1"], T["A2"], T["B1"], T["B2"]
    nx, ns, ny = A1.shape[1], A1.shape[2], B1.shape[1]
    if gamma >= 1:
        raise ClbenchError("the converged diagonal-Fisher form needs gamma < 1 (gamma = 1 is vanilla)")
    lam = (nx / ns) * (1 / gamma - 1)
    d = lam * (A1**2).sum(2)  # (S, Nx)

    def solve(Y, A):  # Y (lam D + A A^T)^-1
        P = 1 / d
        PA = P[:, :, None] * A
        core = torch.eye(ns, dtype=A.dtype) + A.transpose(1, 2) @ PA
        YP = Y * P[:, None, :]
        return YP - (YP @ A) @ torch.linalg.solve(core, PA.transpose(1, 2))

    W1 = solve(B1 @ A1.transpose(1, 2), A1)
    W2 = solve(B2 @ A2.transpose(1, 2) + W1 * d[:, None, :], A2)
    err = lambda W, A, B: ((B - W @ A) ** 2).sum((1, 2)) / ny  # noqa: E731
    raw[:, 1, 0], raw[:, 1, 1] = err(W1, A1, B1), err(W1, A2, B2)
    raw[:, 2, 0], raw[:, 2, 1] = err(W2, A1, B1), err(W2, A2, B2)
    return raw


def scores(raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The authors' scores: transfer = 1 - eps_2 after task 1, retention = 1 - eps_1 after task 2 (raw errors)."""
    return (1 - raw[:, 1, 1]).numpy(), (1 - raw[:, 2, 0]).numpy()


def sampled_similarities(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rho_a, rho_b) uniform on the unit square, Latin-hypercube stratified (unbiased, less scatter than i.i.d.)."""
    rng = np.random.default_rng(seed)
    return ((rng.permutation(n) + rng.random(n)) / n, (rng.permutation(n) + rng.random(n)) / n)


# --- the named experiments ---------------------------------------------------------------------------------
def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def _paired(tr, re, th) -> dict:
    """Standard errors of the per-seed differences simulation - theory (the theory at each seed's similarities)."""
    return {"diff_se": (_mean_se(tr - th[0])[1], _mean_se(re - th[1])[1])}


def _uniform_average(f: Callable, n: int = 200) -> np.ndarray:
    """Mean of f(rho_a, rho_b) over the unit square (midpoint rule, n x n)."""
    g = (np.arange(n) + 0.5) / n
    a, b = np.meshgrid(g, g, indexing="ij")
    return np.array([np.mean(v) for v in f(a, b)])


def vanilla_grid(cfg: dict, base: dict) -> dict:
    """Figure 2 of the paper: vanilla transfer and retention over the (rho_a, rho_b) grid, 100 epochs."""
    grid, seeds = cfg["grid"], cfg["seed_list"]
    rows = []
    for a in grid:
        for b in grid:
            tr, re = scores(simulate("vanilla", mix(base, a, b), seeds, epochs=100)["raw"])
            th = vanilla_theory(a, b)
            rows.append({"rho_a": a, "rho_b": b, "transfer": _mean_se(tr), "retention": _mean_se(re),
                         "theory": (float(th[0]), float(th[1]))})
    return {"rows": rows}


def regularisers(cfg: dict, base: dict) -> dict:
    """Figure 4: L2, diagonal and full Fisher against gamma, (rho_a, rho_b) uniform, 500 epochs."""
    seeds, (ra, rb) = cfg["seed_list"], cfg["sampled"]
    T = mix(base, ra, rb)
    out = {}
    for method in ("l2", "ewc-diag", "ewc-full"):
        rows = []
        for gamma in cfg["gammas"]:
            name = "vanilla" if (gamma >= 1 and method == "ewc-diag") else method
            tr, re = scores(simulate(name, T, seeds, epochs=500, gamma=gamma)["raw"])
            th = l2_theory(ra, rb, gamma) if method != "ewc-full" else None
            rows.append({"gamma": gamma, "transfer": _mean_se(tr), "retention": _mean_se(re),
                         "theory": None if th is None else (float(np.mean(th[0])), float(np.mean(th[1]))),
                         **({} if th is None else _paired(tr, re, th))})
        out[method] = rows
    return out


def gating(cfg: dict, base: dict) -> dict:
    """Figure 5: random (100 epochs) and adaptive (500 epochs) activity gating against alpha, (rho_a, rho_b) uniform."""
    seeds, (ra, rb) = cfg["seed_list"], cfg["sampled"]
    T = mix(base, ra, rb)
    out: dict = {"random": [], "adaptive": []}
    for alpha in cfg["alphas"]:
        for kind, method, epochs in (("random", "gating", 100), ("adaptive", "adaptive", 500)):
            r = simulate(method, T, seeds, epochs=epochs, alpha=alpha)
            tr, re = scores(r["raw"])
            th = gating_theory(ra, rb, alpha)
            out[kind].append({"alpha": alpha, "transfer": _mean_se(tr), "retention": _mean_se(re),
                              "theory": (float(np.mean(th[0])), float(np.mean(th[1]))),
                              "average": gating_average(alpha), "rho_g": float(r["rho_g"].mean()),
                              **_paired(tr, re, th)})
    return out


def plasticity(cfg: dict, base: dict) -> dict:
    """Plasticity gating against alpha, 500 epochs: in theory the same as vanilla."""
    seeds, (ra, rb) = cfg["seed_list"], cfg["sampled"]
    T = mix(base, ra, rb)
    th = vanilla_theory(ra, rb)
    rows = []
    for alpha in cfg["alphas"]:
        tr, re = scores(simulate("plasticity", T, seeds, epochs=500, alpha=alpha)["raw"])
        rows.append({"alpha": alpha, "transfer": _mean_se(tr), "retention": _mean_se(re),
                     "theory": (float(np.mean(th[0])), float(np.mean(th[1]))), **_paired(tr, re, th)})
    return {"rows": rows}


FINITE_WIDTH = 2 * NS / NX  # the closed forms are Nx -> infinity; at Nx = 3000 they are off by about Ns/Nx


def permuted_latent(cfg: dict, base: dict) -> dict:
    """Figure 6 (vanilla part), much reduced: permuted (Fashion-)MNIST with the latent readout, through
    ``clbench.run``, with the authors' network and optimiser (pm/pm_vanilla_perm1.py): 784-1500-10 ReLU,
    weights and biases N(0, 1/fan_in^2), plain SGD, batch 300 unshuffled, MSE; any derangement of the
    chosen pixels and task 1 a partial permutation of the raw images. Scores 1 - error/error_at_init."""
    from clbench import make_strategy, make_stream, run

    pm = cfg["mnist"]
    if pm is None:
        return {"skipped": "not part of this size"}
    dataset = None
    for name in ("permuted-mnist", "permuted-fashion-mnist"):
        try:
            make_stream(name, tasks=1, train_samples=10, test_samples=10)
            dataset = name
            break
        except ClbenchError:
            continue
    if dataset is None:
        return {"skipped": "neither MNIST nor Fashion-MNIST found (apt-get install dataset-fashion-mnist)"}
    rows = []
    for a in pm["rho_a"]:
        for b in pm["rho_b"]:
            stream = make_stream(dataset, tasks=2, rho_a=a, rho_b=b, readout="latent", train_samples=pm["train"],
                                 test_samples=pm["test"], permutation="derangement", first_task="permuted", seed=0)
            r = run(stream, make_strategy("finetune", epochs=pm["epochs"], lr=pm["lr"], batch_size=300, shuffle=False),
                    model_name="mlp", model_args={"widths": (1500,), "init": "small"}, device="cpu", seed=0,
                    progress=False)
            rows.append({"rho_a": a, "rho_b": b, "transfer": r.R[1][1], "retention": r.R[2][0],
                         "learned": r.R[1][0], "raw": r.extra["raw"]})
    return {"dataset": dataset, "rows": rows, **pm}


EXPERIMENTS: dict[str, Callable[[dict, dict], dict]] = {
    "vanilla_grid": vanilla_grid, "regularisers": regularisers, "gating": gating, "plasticity": plasticity,
    "permuted_latent": permuted_latent}


def deviations(results: dict) -> dict[str, dict[str, float]]:
    """Per panel with a closed form: the largest |simulation mean - theory| and the largest seed-noise SE."""
    out = {}
    panels = {"vanilla": results["vanilla_grid"]["rows"], "L2": results["regularisers"]["l2"],
              "random gating": results["gating"]["random"], "plasticity gating": results["plasticity"]["rows"]}
    for name, rows in panels.items():
        se_of = lambda r, i, k: r["diff_se"][i] if "diff_se" in r else r[k][1]  # noqa: E731
        keys = list(enumerate(("transfer", "retention")))
        dev = max(abs(r[k][0] - r["theory"][i]) for r in rows for i, k in keys)
        se = max(se_of(r, i, k) for r in rows for i, k in keys)
        z = max(abs(r[k][0] - r["theory"][i]) / max(se_of(r, i, k), 1e-12) for r in rows for i, k in keys)
        tol = [3 * se_of(r, i, k) + FINITE_WIDTH for r in rows for i, k in keys]
        off = [abs(r[k][0] - r["theory"][i]) for r in rows for i, k in enumerate(("transfer", "retention"))]
        out[name] = {"max_deviation": dev, "max_se": se, "max_z": z, "points": len(off),
                     "outside_noise": int(sum(o > t for o, t in zip(off, tol)))}
    return out


def run_experiments(size: str = "full", progress: Callable[[str], None] | None = None) -> dict:
    """All teacher-student experiments at ``size`` (quick | full); returns their results and timings."""
    if size not in SIZES:
        raise ClbenchError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    torch.set_num_threads(1)  # many tiny matrix products: threads only add overhead on a shared machine
    cfg = dict(SIZES[size])
    cfg["seed_list"] = list(range(cfg["seeds"]))
    cfg["sampled"] = sampled_similarities(cfg["seeds"], seed=2024)
    start = time.process_time()  # CPU seconds of this process: on a shared machine wall time says little
    base = base_teachers(cfg["seed_list"], cfg["input_dim"])
    results: dict = {"size": size, "timings_s": {"teachers": time.process_time() - start}}
    for name, experiment in EXPERIMENTS.items():
        t0 = time.process_time()
        if progress:
            progress(name)
        results[name] = experiment(cfg, base)
        results["timings_s"][name] = time.process_time() - t0
    results["deviations"] = deviations(results)
    results["config"] = {k: v for k, v in cfg.items() if k not in ("sampled", "mnist")}
    return results


# --- figures and the report ---------------------------------------------------------------------------------
def _figures(results: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    rows = results["vanilla_grid"]["rows"]
    grid = sorted({r["rho_a"] for r in rows})
    n = len(grid)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for i, key in enumerate(("transfer", "retention")):
        sim = np.array([[next(r[key][0] for r in rows if r["rho_a"] == a and r["rho_b"] == b) for a in grid] for b in grid])
        th = np.array([[vanilla_theory(a, b)[i] for a in grid] for b in grid])
        for j, (m, title) in enumerate(((sim, "simulation"), (th, "theory"))):
            ax = axes[i, j]
            im = ax.imshow(m, origin="lower", extent=(-0.5 / (n - 1), 1 + 0.5 / (n - 1)) * 2, vmin=-1, vmax=1,
                           cmap="RdBu_r" if key == "transfer" else "viridis")
            ax.set(title=f"vanilla {key}: {title}", xlabel="rho_a (input similarity)", ylabel="rho_b (readout similarity)")
            fig.colorbar(im, ax=ax)
            if key == "retention":  # retention rises with rho_a where 2 rho_a^2 - 3 rho_a rho_b + 1 < 0
                a, b = np.meshgrid(np.linspace(0, 1, 200), np.linspace(0, 1, 200))
                ax.contour(a, b, 2 * a**2 - 3 * a * b + 1, levels=[0], colors="w", linestyles="--")
        ax = axes[i, 2]
        for k, b in enumerate(sorted({0.0, 0.5, 1.0} | ({0.9} if 0.9 in grid else set()))):
            pts = [(r["rho_a"], *r[key]) for r in rows if r["rho_b"] == b]
            x = np.linspace(0, 1, 101)
            ax.plot(x, vanilla_theory(x, b)[i], color=f"C{k}", label=f"theory rho_b={b}")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fmt="o", color=f"C{k}")
        ax.set(title=f"{key} against rho_a (points: simulation)", xlabel="rho_a", ylabel=key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files["vanilla"] = "vanilla_grid.png"
    fig.savefig(out / files["vanilla"], dpi=90)
    plt.close(fig)

    reg = results["regularisers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    g = np.linspace(0.05, 1, 60)
    for i, key in enumerate(("transfer", "retention")):
        ax = axes[i]
        ax.plot(g, [_uniform_average(lambda a, b, gg=gg: l2_theory(a, b, gg))[i] for gg in g], "k-",
                label="L2 theory (uniform rho)")
        for k, (m, label) in enumerate((("l2", "L2"), ("ewc-diag", "diagonal Fisher"), ("ewc-full", "full Fisher"))):
            pts = reg[m]
            ax.errorbar([p["gamma"] + 0.01 * (k - 1) for p in pts], [p[key][0] for p in pts], [p[key][1] for p in pts],
                        fmt="o-", color=f"C{k}", label=label)
        ax.set(xlabel="gamma (the paper's strength; 1 = none)", ylabel=key,
               title=f"weight regularisation: {key}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files["regularisers"] = "regularisers.png"
    fig.savefig(out / files["regularisers"], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    al = np.linspace(0, 1, 101)
    for i, key in enumerate(("transfer", "retention")):
        ax = axes[i]
        ax.plot(al, [gating_average(a)[i] for a in al], "k-", label="random gating, closed-form average")
        for k, (kind, label) in enumerate((("random", "random gating"), ("adaptive", "adaptive gating"))):
            pts = results["gating"][kind]
            ax.errorbar([p["alpha"] for p in pts], [p[key][0] for p in pts], [p[key][1] for p in pts], fmt="o-",
                        color=f"C{k}", label=label)
        pts = results["plasticity"]["rows"]
        ax.errorbar([p["alpha"] for p in pts], [p[key][0] for p in pts], [p[key][1] for p in pts], fmt="s--",
                    color="C2", label="plasticity gating")
        ax.axhline([1 / 6, _uniform_average(vanilla_theory)[1]][i], color="C2", lw=0.8, label="vanilla theory average")
        ax.set(xlabel="alpha (active / plastic fraction)", ylabel=key, title=f"gating: {key}, rho uniform")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files["gating"] = "gating.png"
    fig.savefig(out / files["gating"], dpi=90)
    plt.close(fig)
    return files


def _fmt(v: tuple[float, float]) -> str:
    return f"{v[0]:+.3f} ± {v[1]:.3f}"


def _permuted_section(pm: dict) -> list[str]:
    L = ["", "## Permuted (Fashion-)MNIST, latent readout (vanilla)", ""]
    if "skipped" in pm:
        return L + [f"Skipped: {pm['skipped']}."]
    L += [f"Dataset `{pm['dataset']}`, {pm['train']} training and {pm['test']} test images (a seeded subset), "
          f"2 tasks, {pm['epochs']} epochs a task (the authors: all 60000 images, 100 epochs), learning rate "
          f"{pm['lr']} (the authors pass theirs on the command line), one seed. 784-1500-10 ReLU network with "
          "N(0, 1/fan_in^2) weights and biases, plain SGD with batch 300 in a fixed order, MSE on the latent "
          "readout, a derangement of round(784 (1 - rho_a)) pixels, task 1 itself a partial permutation "
          "(clbench: `permuted-*-mnist readout=latent permutation=derangement first_task=permuted`, "
          "`mlp init=small`, `shuffle=false`). No closed form: the paper's qualitative claims are that "
          "transfer rises with readout similarity when inputs are similar, and that forgetting is worst for "
          "similar inputs with dissimilar readouts. Scores 1 - error/error_at_init.", "",
          "| rho_a | rho_b | task 1 learned | transfer | retention |", "|---|---|---|---|---|"]
    for r in pm["rows"]:
        L.append(f"| {r['rho_a']} | {r['rho_b']} | {r['learned']:+.3f} | {r['transfer']:+.3f} | {r['retention']:+.3f} |")
    return L


def _departures(results: dict, cfg: dict) -> list[str]:
    """Where simulation and closed form part, with the reason computed from the settings."""
    L = ["", "## Where simulation and closed form part, and why", ""]
    ratio = cfg["input_dim"] / NS
    for r in results["gating"]["random"]:
        learned = 1 - math.exp(-2 * r["alpha"] * ratio * ETA * 100)  # typical mode of the gated task-1 fit
        if learned < 0.99:
            L.append(f"- Random gating at alpha = {r['alpha']}: 100 epochs (the authors' `lst_cg.py`) fit task 1 "
                     f"only to about {learned:.2f} of the way (error decays as exp(-2 alpha (Nx/Ns) eta t)), so "
                     f"retention {r['retention'][0]:.3f} falls short of the converged closed form "
                     f"{r['theory'][1]:.3f}.")
    for r in results["plasticity"]["rows"]:
        if r["alpha"] * ratio < 20:
            L.append(f"- Plasticity gating at alpha = {r['alpha']}: only alpha Nx = {r['alpha'] * cfg['input_dim']:.0f} "
                     f"plastic inputs for Ns = {NS} latents, far from the over-parameterised limit the closed form "
                     f"assumes (transfer {r['transfer'][0]:+.3f} vs {r['theory'][0]:+.3f}).")
    L.append(f"- Everywhere: the closed forms are the Nx -> infinity limit; at Nx/Ns = {ratio:.0f} the simulated transfer "
             "sits a few hundredths below them.")
    return L


def report(results: dict, out: Path, files: dict[str, str]) -> str:
    """The Markdown report (generated; never edit it by hand)."""
    from clbench import __version__

    cfg, dev, t = results["config"], results["deviations"], results["timings_s"]
    total = sum(t.values())
    L = [f"# Reproduction: Hiratani, NeurIPS 2024 (teacher-student), size `{results['size']}`", "",
         "Generated by `clbench reproduce hiratani2024" + (" --quick" if results["size"] == "quick" else "") +
         f"` (clbench {__version__}, torch {torch.__version__}); do not edit by hand.", "",
         f"Seeds per point: {cfg['seeds']}; Ns = {NS}, Nx = {cfg['input_dim']}, Ny = {NY}; "
         f"compute: {total:.0f} CPU seconds, one thread ({', '.join(f'{k} {v:.0f} s' for k, v in t.items())}).", "",
         "Settings are the authors' (github nhiratani/transfer_retention_model, `teacher-student/lst_*.py`): "
         "W from 0, full-batch gradient descent W <- W + 1e-3 (B - W X) X^T on the expected loss, 100 epochs for "
         "vanilla and random gating, 500 for adaptive and plasticity gating and the regularisers, Bernoulli(alpha) "
         "input gates without rescaling, scores 1 - error (raw, not divided by the error at initialisation). "
         "Simulations use clbench's `teacher-student` teachers seed by seed and train in closed latent form "
         "(checked against `clbench.run` with the corresponding strategies in tests/test_hiratani2024.py). "
         "Panels averaged over similarity draw (rho_a, rho_b) uniformly (Latin hypercube, one pair per seed) "
         "as the authors' `simul_set2/3` do; their theory column is the closed form at the same pairs.", "",
         "Tolerance for 'within seed noise': 3 standard errors + 2 Ns/Nx (the closed forms are the Nx -> infinity "
         f"limit; at Nx = {cfg['input_dim']} finite-width effects are about Ns/Nx).", "",
         "## Largest deviations from theory", "", "| panel | largest abs(sim - theory) | largest SE of (sim - theory) | points outside 3 SE + 2 Ns/Nx |",
         "|---|---|---|---|"]
    for name, d in dev.items():
        L.append(f"| {name} | {d['max_deviation']:.3f} | {d['max_se']:.3f} | {d['outside_noise']} of {d['points']} |")
    L += ["", "## Vanilla: transfer and retention over (rho_a, rho_b)", "", f"![vanilla]({files['vanilla']})", "",
          "Theory: transfer = rho_a (2 rho_b - rho_a), retention = 1 - rho_a^2 (rho_a^2 - 2 rho_a rho_b + 1). "
          "Dashed white line: where retention turns non-monotonic in rho_a (it rises with rho_a where "
          "2 rho_a^2 - 3 rho_a rho_b + 1 < 0, i.e. rho_b > 0.943 and rho_a between the roots).",
          f"Largest deviation: {dev['vanilla']['max_deviation']:.3f} (largest SE {dev['vanilla']['max_se']:.3f}).", "",
          "| rho_a | rho_b | transfer (sim) | theory | retention (sim) | theory |", "|---|---|---|---|---|---|"]
    for r in results["vanilla_grid"]["rows"]:
        if r["rho_a"] in (0.0, 0.5, 0.9, 1.0) and r["rho_b"] in (0.0, 0.5, 0.9, 1.0):
            L.append(f"| {r['rho_a']} | {r['rho_b']} | {_fmt(r['transfer'])} | {r['theory'][0]:+.3f} | "
                     f"{_fmt(r['retention'])} | {r['theory'][1]:+.3f} |")
    L += ["", "## Weight regularisation: L2, diagonal and full Fisher against strength", "",
          f"![regularisers]({files['regularisers']})", "",
          "gamma is the paper's strength: L2 and diagonal Fisher lambda = (Nx/Ns)(1/gamma - 1) (task 1 also pulled "
          "to W = 0, as `lst_wn.py` and `lst_cwn_diag.py`), full Fisher lambda_c = 1/gamma - 1 (task 1 plain, as "
          "`lst_cwn.py` simul_set3). In clbench: `l2`/`ewc-diag` with `anchor_initial=true, gamma=...`, `ewc-full` "
          "with `gamma=...` (strength = 2 lambda / Ny). L2 theory from the authors' `lst_wn_theory.py`; the diagonal "
          "Fisher tends to it as Nx -> infinity. The full Fisher has no closed form here; the paper's claim is that "
          "its retention stays near 1 whatever the similarity.",
          f"Largest deviation (L2): {dev['L2']['max_deviation']:.3f}.", "",
          "| method | gamma | transfer (sim) | theory | retention (sim) | theory |", "|---|---|---|---|---|---|"]
    for m, rows in results["regularisers"].items():
        for r in rows:
            th = ("—", "—") if r["theory"] is None else (f"{r['theory'][0]:+.3f}", f"{r['theory'][1]:+.3f}")
            L.append(f"| {m} | {r['gamma']} | {_fmt(r['transfer'])} | {th[0]} | {_fmt(r['retention'])} | {th[1]} |")
    L += ["", "## Activity gating (random and adaptive) and plasticity gating against alpha", "",
          f"![gating]({files['gating']})", "",
          "Random gating acts as rho_a -> alpha rho_a; averaged over uniform similarities <transfer> = alpha/2 - "
          "alpha^2/3 and <retention> = 1 - (alpha^4/5 - alpha^3/4 + alpha^2/3). Adaptive gating (`lst_acg.py`): "
          "after task 1, rho_g = clip(error(W = 0) - error(old gate), 0, 1) on task 2, and each unit keeps the old "
          "gate with probability rho_g (clbench `adaptive-gating rule=paper sampling=bernoulli rescale=false`). "
          "Plasticity gating masks the updates of a (1 - alpha) share of input columns; in theory it equals vanilla.",
          f"Largest deviation: random gating {dev['random gating']['max_deviation']:.3f}, plasticity gating "
          f"{dev['plasticity gating']['max_deviation']:.3f}.", "",
          "| alpha | random transfer | theory | random retention | theory | closed-form averages | adaptive transfer | adaptive retention | mean rho_g |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r, a in zip(results["gating"]["random"], results["gating"]["adaptive"]):
        L.append(f"| {r['alpha']} | {_fmt(r['transfer'])} | {r['theory'][0]:+.3f} | {_fmt(r['retention'])} | "
                 f"{r['theory'][1]:+.3f} | {r['average'][0]:+.3f}, {r['average'][1]:+.3f} | {_fmt(a['transfer'])} | "
                 f"{_fmt(a['retention'])} | {a['rho_g']:.2f} |")
    L += ["", "| alpha | plasticity transfer | vanilla theory | plasticity retention | vanilla theory |", "|---|---|---|---|---|"]
    for r in results["plasticity"]["rows"]:
        L.append(f"| {r['alpha']} | {_fmt(r['transfer'])} | {r['theory'][0]:+.3f} | {_fmt(r['retention'])} | "
                 f"{r['theory'][1]:+.3f} |")
    L += _permuted_section(results["permuted_latent"])
    L += _departures(results, cfg)
    L += ["", "## What differs from the paper", "",
          f"- Seeds: {cfg['seeds']} per point (the authors: 10 for vanilla, 100 for random gating; the paper's "
          "figures average over their runs). Scores are the authors' raw 1 - error; clbench's default score "
          "1 - error/error_at_init is in every clbench result too (`Result.R`, raw errors in `Result.extra['raw']`).",
          "- Random numbers: clbench's torch generators, not JAX's; the teachers are clbench's `teacher-student` stream.",
          "- Diagonal Fisher: the converged minimiser of the same objective instead of 500 epochs of gradient "
          "descent, and task 1 is pulled to W = 0 with task 1's own diag(A1 A1^T) (the authors use an independent "
          "draw A0 with the same statistics).",
          "- Hardware: CPU (float64 latent-form updates); the authors ran JAX (float32).",
          "- Permuted (Fashion-)MNIST: one seed, a subset and far fewer epochs (see its section); only the "
          "vanilla part of Figure 6 (the gating and layer-wise-Fisher variants of pm/*.py are not rerun)."]
    text = "\n".join(L) + "\n"
    (out / "README.md").write_text(text)
    return text


def reproduce(output: str | os.PathLike, quick: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Run the experiments at the quick or full size and write ``output``/README.md, results.json and the figures."""
    import json

    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ClbenchError(f"cannot write the report to {str(out)!r} ({e.strerror}); pass a writable --output DIR") from None
    results = run_experiments("quick" if quick else "full", progress)
    files = _figures(results, out)
    report(results, out, files)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return out / "README.md"

"""Teacher-student stream of Hiratani, "Disentangling and mitigating the impact
of task similarity for continual learning" (NeurIPS 2024).

Latent s ~ N(0, I_Ns); input x = A s; target y = B s, with A (Nx x Ns) and
B (Ny x Ns) drawn with N(0, 1/Ns) entries. Each next task mixes in fresh
matrices: A' = rho_a A + sqrt(1 - rho_a^2) A~ (input similarity) and
B' = rho_b B + sqrt(1 - rho_b^2) B~ (readout similarity). The student is the
linear map y = W x from W = 0 (model ``linear``).

``mode="exact"`` trains on the expected loss, as in the paper: the Ns samples
sqrt(Ns) A e_k with targets sqrt(Ns) B e_k (e_k the latent basis) give
mean_k ||W x_k - y_k||^2 / Ny = ||B - W A||_F^2 / Ny exactly, so full-batch
gradient descent on them is gradient descent on the expected error.
``mode="sampled"`` trains on ``samples`` random latents in minibatches. Both
evaluate the exact expected error; the score is 1 - error/error_at_init.

For vanilla training to convergence with Nx >> Ns, transfer = rho_a (2 rho_b - rho_a)
and retention = 1 - rho_a^2 (rho_a^2 - 2 rho_a rho_b + 1) (see ``theory``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from clbench.core.errors import ClbenchError, check_unit_interval
from clbench.core.progress import steps
from clbench.core.registry import register_stream
from clbench.core.types import Stream, Task, TrainDefaults


def theory(rho_a: Any, rho_b: Any) -> dict[str, Any]:
    """Hiratani's closed forms for vanilla (finetune) training, two tasks, Nx -> infinity (numbers or arrays):
    transfer rho_a (2 rho_b - rho_a), retention 1 - rho_a^2 (rho_a^2 - 2 rho_a rho_b + 1)."""
    return {
        "transfer": rho_a * (2 * rho_b - rho_a),
        "retention": 1 - rho_a**2 * (rho_a**2 - 2 * rho_a * rho_b + 1),
    }


def _next(M: torch.Tensor, rho: float, g: torch.Generator, scale: float) -> torch.Tensor:
    fresh = torch.randn(M.shape, generator=g, dtype=torch.float64) * scale
    return rho * M + math.sqrt(max(1.0 - rho * rho, 0.0)) * fresh


@register_stream("teacher-student")
def teacher_student(
    tasks: int = 2,
    rho_a: float = 0.5,
    rho_b: float = 0.5,
    latent_dim: int = 30,
    input_dim: int = 3000,
    output_dim: int = 10,
    mode: str = "exact",
    samples: int = 3000,
    seed: int = 0,
) -> Stream:
    """Hiratani's linear teacher-student tasks with input (rho_a) and readout (rho_b) similarity; needs no data."""
    rho_a = check_unit_interval("rho_a", rho_a, -1.0, 1.0)
    rho_b = check_unit_interval("rho_b", rho_b, -1.0, 1.0)
    if mode not in ("exact", "sampled"):
        raise ClbenchError(f"mode must be 'exact' or 'sampled', got {mode!r}")
    for name, value in (("tasks", tasks), ("latent_dim", latent_dim), ("input_dim", input_dim),
                        ("output_dim", output_dim), ("samples", samples)):
        if not isinstance(value, int) or value < 1:
            raise ClbenchError(f"{name} must be a positive integer, got {value!r}")
    g = torch.Generator().manual_seed(int(seed))
    g_samples = torch.Generator().manual_seed(int(seed) + 1)  # separate, so both modes share the teachers
    scale = 1.0 / math.sqrt(latent_dim)
    A = torch.randn(input_dim, latent_dim, generator=g, dtype=torch.float64) * scale
    B = torch.randn(output_dim, latent_dim, generator=g, dtype=torch.float64) * scale
    basis = math.sqrt(latent_dim) * torch.eye(latent_dim, dtype=torch.float64)
    task_list = []
    for t in steps(range(tasks), tasks, f"building teacher-student ({tasks} tasks)"):
        if t > 0:
            A, B = _next(A, rho_a, g, scale), _next(B, rho_b, g, scale)
        test_x, test_y = basis @ A.T, basis @ B.T
        if mode == "exact":
            train_x, train_y = test_x, test_y
        else:
            s = torch.randn(samples, latent_dim, generator=g_samples, dtype=torch.float64)
            train_x, train_y = s @ A.T, s @ B.T
        task_list.append(Task(
            id=t, train_x=train_x.float(), train_y=train_y.float(), test_x=test_x.float(), test_y=test_y.float(),
            metadata={"rho_a": rho_a, "rho_b": rho_b, "A": A.float(), "B": B.float()},
        ))
    # W <- W + eta (B - W A) A^T with eta = 1e-3 (the paper) is SGD on ||B - WA||^2/Ny at lr = eta * Ny / 2.
    defaults = TrainDefaults(
        model="linear", model_args={"bias": False, "zero_init": True},
        epochs=100 if mode == "exact" else 10,
        batch_size=latent_dim if mode == "exact" else 100,
        lr=1e-3 * output_dim / 2, optimizer="sgd",
    )
    return Stream(
        name="teacher-student", tasks=task_list, scenario="domain", loss="mse",
        input_shape=(input_dim,), num_outputs=output_dim, defaults=defaults,
        provenance={"dataset": "synthetic", "rho_a": rho_a, "rho_b": rho_b, "latent_dim": latent_dim,
                    "input_dim": input_dim, "output_dim": output_dim, "mode": mode, "seed": int(seed)},
    )

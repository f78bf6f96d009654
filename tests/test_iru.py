"""IRU (Hyder et al. 2022): zero forgetting and the exact parameter growth formula."""
import numpy as np
import pytest
import torch
from torch import nn

import clbench
from clbench.core.types import Stream, Task, TrainDefaults


def permuted_stream(T=3, n=256, side=6, classes=2, seed=0, scenario="task"):
    """Random-permutation tasks on a tiny synthetic dataset (labels from a random linear teacher)."""
    g = torch.Generator().manual_seed(seed)
    d = side * side
    x = torch.randn(2 * n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    tasks = []
    for t in range(T):
        perm = torch.arange(d) if t == 0 else torch.randperm(d, generator=g)
        xt = x[:, perm].reshape(-1, 1, side, side)
        head = torch.arange(t * classes, (t + 1) * classes) if scenario == "task" else None
        tasks.append(Task(t, xt[:n], y[:n], xt[n:], y[n:], head=head))
    return Stream("tiny-permuted", tasks, scenario, "ce", (1, side, side),
                  classes * T if scenario == "task" else classes,
                  TrainDefaults(model="mlp", model_args={"widths": [32, 16]}, epochs=20, batch_size=64, lr=0.01,
                                optimizer="adam"))


def expected_growth(layers, head, r1, r2, T, bias=True):
    """Parameters added per task: r (n_in + n_out) + R_t + n_out per layer, plus a full output layer."""
    out, R = [], 0
    for t in range(T):
        r = r1 if t == 0 else r2
        R += r
        out.append(sum(r * (i + o) + R + (o if bias else 0) for i, o in layers) + (head[0] + 1) * head[1])
    return out


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_iru_zero_forgetting_and_growth(scenario):
    stream = permuted_stream(scenario=scenario)
    result = clbench.run(stream, clbench.make_strategy("iru", r1=4, r2=1, lr=0.01), device="cpu", progress=False)
    R = np.array(result.R)
    T = len(stream)
    for j in range(T):
        assert R[T, j] == R[j + 1, j], (j, R)          # exactly equal: nothing of task j changes
        assert R[j + 1, j] > 0.7, R                    # and every task was learned
    growth = result.extra["iru_parameters_per_task"]
    layers = [(36, 32), (32, 16)]
    assert result.extra["iru_layers"] == [list(l) for l in layers] or result.extra["iru_layers"] == layers
    assert growth == expected_growth(layers, (16, stream.num_outputs), 4, 1, T)
    assert sum(growth) == result.parameter_count


def test_iru_conv_layers_match_formula_and_dense_weight():
    """A Conv2d factorised as U diag(s) V^T of the (out x in*k*k) kernel gives the same output as the dense conv."""
    stream = permuted_stream(T=2)
    model = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, stream.num_outputs))
    strategy = clbench.make_strategy("iru", r1=3, r2=2)
    result = clbench.run(stream, strategy, model, device="cpu", progress=False)
    R = np.array(result.R)
    assert R[2, 0] == R[1, 0]
    assert result.extra["iru_parameters_per_task"] == expected_growth([(9, 5)], (180, stream.num_outputs), 3, 2, 2)
    conv = strategy.layers[0]
    conv.slot = 1
    U, V = torch.cat(list(conv.U), 1), torch.cat(list(conv.V), 1)
    W = (U * conv.s[1]) @ V.T
    x = torch.randn(4, 1, 6, 6)
    dense = nn.functional.conv2d(x, W.reshape(5, 1, 3, 3), conv.b[1], padding=1)
    torch.testing.assert_close(conv(x), dense)


def test_iru_finetune_forgets_on_same_stream():
    """The stream is hard enough that sharing weights forgets: the zero-forgetting test can fail."""
    stream = permuted_stream(scenario="domain")
    R = np.array(clbench.run(stream, clbench.make_strategy("finetune"), device="cpu", progress=False).R)
    assert R[3, 0] < R[1, 0] - 0.05


def test_iru_rejects_bad_input():
    with pytest.raises(clbench.ClbenchError, match="r1"):
        clbench.make_strategy("iru", r1=0)
    stream = permuted_stream(T=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, stream.num_outputs))
    with pytest.raises(clbench.ClbenchError, match="BatchNorm1d"):
        clbench.run(stream, clbench.make_strategy("iru"), model, device="cpu", progress=False)

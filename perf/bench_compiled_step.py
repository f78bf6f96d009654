"""Does ``torch.compile`` pay for the batched training step? clbench's step, plain eager and compiled, each
against the step's own matrix products, side by side in one process.

The step of a batched finetune seed sweep on Fashion-MNIST-sized inputs: B members, MLP 784-100-10 stacked as
(B, out, in) weights, batch 128, the batch gathered from each member's own order, cross-entropy, backward
and an SGD update. ``clbench`` is clbench.batched's own step (the batch taken as its loop takes it, by one
index_select; StackedNet, whose custom backward forms the weight gradient as g^T x; the engine's SGD);
``eager`` the same maths through plain autograd (baddbmm);
``compiled`` that wrapped in ``torch.compile`` (inductor; AOTAutograd compiles the backward too).
``matmuls`` times the five batched matrix products a step needs (two forward, three backward) alone, in
StackedNet's layouts. The rows are timed in ``--rounds`` interleaved rounds of ``--steps`` steps and each
reports its best round, so a busy moment of the machine does not fall on one row only. Prints ms a step,
the compile time and the ratios.

    python perf/bench_compiled_step.py [--members 8] [--steps 100] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from clbench.batched.inputs import DenseInputs
    from clbench.batched.stacked import StackedNet
    from clbench.core.engine import make_optimizer

    B, N, D, H, O = args.members, 128, 784, 100, 10
    torch.manual_seed(0)
    params = [(torch.randn(B, H, D) * D ** -0.5).requires_grad_(), torch.zeros(B, 1, H, requires_grad=True),
              (torch.randn(B, O, H) * H ** -0.5).requires_grad_(), torch.zeros(B, 1, O, requires_grad=True)]
    images, labels = torch.rand(B, 6000, D), torch.randint(0, O, (B, 6000))
    rows = torch.arange(B)[:, None]
    net = StackedNet([nn.Sequential(nn.Flatten(), nn.Linear(D, H), nn.ReLU(), nn.Linear(H, O)) for _ in range(B)])
    optimizer = make_optimizer("sgd", net.params, 0.01)

    def loss_of(x, y, w1, b1, w2, b2):
        out = torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1.transpose(1, 2))), w2.transpose(1, 2))
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(B, -1).mean(1).sum()

    def plain_step(fn: Callable) -> Callable[[torch.Tensor], None]:
        def step(idx: torch.Tensor) -> None:
            loss = fn(images[rows, idx], labels[rows, idx], *params)
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p.sub_(0.01 * p.grad)
        return step

    inputs, members = DenseInputs(images), torch.arange(B)

    def clbench_step(idx: torch.Tensor) -> None:  # as clbench.batched.group's loop: inputs taken by index_select
        out = net.forward(inputs.take(members, idx))
        loss = F.cross_entropy(out.flatten(0, 1), labels[rows, idx].flatten(), reduction="none").view(B, -1).mean(1)
        for p in net.params:
            p.grad = None
        loss.sum().backward()
        optimizer.step()

    w1, w2 = params[0].detach(), params[2].detach()
    x, gh, go = torch.rand(B, N, D), torch.randn(B, N, H), torch.randn(B, N, O)

    def matmuls(idx: torch.Tensor) -> None:
        h = torch.bmm(x, w1.transpose(1, 2))
        torch.bmm(h, w2.transpose(1, 2))
        torch.bmm(go, w2)
        torch.bmm(go.transpose(1, 2), h)
        torch.bmm(gh.transpose(1, 2), x)

    start = time.perf_counter()
    compiled_step = plain_step(torch.compile(loss_of))
    compiled_step(torch.randint(0, 6000, (B, N)))
    compile_s = time.perf_counter() - start
    rows_timed = {"clbench": clbench_step, "eager": plain_step(loss_of), "compiled": compiled_step, "matmuls": matmuls}
    best = {name: float("inf") for name in rows_timed}
    for _ in range(args.rounds):
        for name, step in rows_timed.items():
            orders = [torch.randint(0, 6000, (B, N)) for _ in range(args.steps)]
            start = time.perf_counter()
            for idx in orders:
                step(idx)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    ceiling = best["matmuls"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {B} members, MLP 784-100-10, batch 128; "
          f"best of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"clbench  {best['clbench'] * 1e3:7.2f} ms a step  ({best['clbench'] / ceiling:.2f}x its matmuls)")
    print(f"eager    {best['eager'] * 1e3:7.2f} ms a step  ({best['eager'] / ceiling:.2f}x its matmuls)")
    saved = best["eager"] - best["compiled"]
    print(f"compiled {best['compiled'] * 1e3:7.2f} ms a step  ({best['compiled'] / ceiling:.2f}x its matmuls; compiling "
          f"took {compile_s:.1f} s" + (f", repaid after {compile_s / saved:.0f} steps)" if saved > 0 else ", never repaid)"))
    print(f"matmuls  {ceiling * 1e3:7.2f} ms a step")


if __name__ == "__main__":
    main()

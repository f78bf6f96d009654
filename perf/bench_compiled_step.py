"""Does ``torch.compile`` pay for the batched training step? Eager against compiled, and both against the
step's own matrix products, side by side in one process.

The step of a batched finetune seed sweep on Fashion-MNIST-sized inputs: B members, MLP 784-100-10 stacked as
(B, out, in) weights, batch 128, the batch gathered from each member's own order, cross-entropy, backward
and an SGD update, exactly the operations clbench.batched runs. ``compiled`` wraps the forward and loss in
``torch.compile`` (inductor; AOTAutograd compiles the backward too). ``matmuls`` times the five batched
matrix products a step needs (two forward, three backward) alone. Prints ms a step, the compile time and the
ratios.

    python perf/bench_compiled_step.py [--members 8] [--steps 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, N, D, H, O = args.members, 128, 784, 100, 10
    torch.manual_seed(0)
    params = [(torch.randn(B, H, D) * D ** -0.5).requires_grad_(), torch.zeros(B, 1, H, requires_grad=True),
              (torch.randn(B, O, H) * H ** -0.5).requires_grad_(), torch.zeros(B, 1, O, requires_grad=True)]
    images, labels = torch.rand(B, 6000, D), torch.randint(0, O, (B, 6000))
    rows = torch.arange(B)[:, None]

    def loss_of(x, y, w1, b1, w2, b2):
        out = torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1.transpose(1, 2))), w2.transpose(1, 2))
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(B, -1).mean(1).sum()

    def step(fn, idx):
        loss = fn(images[rows, idx], labels[rows, idx], *params)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(0.01 * p.grad)

    def per_step(fn):
        orders = [torch.randint(0, 6000, (B, N)) for _ in range(args.steps)]
        start = time.perf_counter()
        for idx in orders:
            step(fn, idx)
        return (time.perf_counter() - start) / args.steps

    eager = per_step(loss_of)
    start = time.perf_counter()
    compiled_fn = torch.compile(loss_of)
    step(compiled_fn, torch.randint(0, 6000, (B, N)))
    compile_s = time.perf_counter() - start
    compiled = per_step(compiled_fn)
    w1, w2 = params[0].detach(), params[2].detach()
    x, gh, go = torch.rand(B, N, D), torch.randn(B, N, H), torch.randn(B, N, O)
    start = time.perf_counter()
    for _ in range(args.steps):
        h = torch.bmm(x, w1.transpose(1, 2))
        torch.bmm(h, w2.transpose(1, 2))
        torch.bmm(go, w2)
        torch.bmm(go.transpose(1, 2), h)
        torch.bmm(gh.transpose(1, 2), x)
    matmuls = (time.perf_counter() - start) / args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {B} members, MLP 784-100-10, batch 128")
    print(f"eager    {eager * 1e3:7.2f} ms a step  ({eager / matmuls:.2f}x its matmuls)")
    print(f"compiled {compiled * 1e3:7.2f} ms a step  ({compiled / matmuls:.2f}x its matmuls; compiling took "
          f"{compile_s:.1f} s, repaid after {compile_s / max(eager - compiled, 1e-9):.0f} steps if positive)")
    print(f"matmuls  {matmuls * 1e3:7.2f} ms a step; compiled / eager {compiled / eager:.2f}")


if __name__ == "__main__":
    main()

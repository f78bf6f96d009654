"""L2P end to end offline: self-pretrained tiny ViT, split Fashion-MNIST, class-incremental.

1. Pretrain a tiny timm ViT on synthetic MNIST-format digits that clbench draws
   itself (`clbench.models.pretrain`; no Fashion-MNIST image is seen in pretraining).
2. Run finetune (the stream's default model) and L2P on split Fashion-MNIST
   (5 tasks of 2 classes, class-incremental), print R, final accuracy, and the
   prompt-selection histogram per task with the total-variation distance
   between tasks' histograms (0 = identical selection).

Needs Fashion-MNIST locally (`apt-get install dataset-fashion-mnist`, or
`clbench data download fashion-mnist`).

    PYTHONPATH=. python perf/l2p_offline.py [--train-per-task 4000] [--epochs 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import clbench
from clbench.models.pretrain import pretrain


def tv_matrix(hists: dict[str, list[int]]) -> np.ndarray:
    p = np.array([np.array(h) / max(sum(h), 1) for h in hists.values()])
    return 0.5 * np.abs(p[:, None] - p[None]).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/clbench_l2p/vit_digits.pth")
    ap.add_argument("--train-per-task", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool-size", type=int, default=10)
    ap.add_argument("--top-n", type=int, default=5)
    ap.add_argument("--prompt-length", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).is_file():
        pretrain(args.checkpoint, "synthetic-digits", samples=12000, epochs=8, lr=2e-3, seed=args.seed)
    # a seeded subset of the training set: about train_per_task images in each of the 5 tasks
    stream = clbench.make_stream("split-fashion-mnist", scenario="class", train_samples=5 * args.train_per_task,
                                 seed=args.seed)
    print(f"stream {stream.name}: {len(stream)} tasks, {args.train_per_task} training samples a task, "
          f"{args.epochs} epochs; backbone pretrained on synthetic digits ({args.checkpoint}); "
          f"L2P pool M={args.pool_size}, L_p={args.prompt_length}, N={args.top_n}")
    runs = {
        "finetune": clbench.make_strategy("finetune", epochs=args.epochs, optimizer="adam", lr=1e-3),
        "l2p": clbench.make_strategy("l2p", backbone_checkpoint=args.checkpoint, epochs=args.epochs, lr=0.01,
                                     pool_size=args.pool_size, top_n=args.top_n, prompt_length=args.prompt_length),
    }
    for name, strategy in runs.items():
        r = clbench.run(stream, strategy, device="cpu", seed=args.seed, progress=False)
        print(f"\n{name}: final ACC {r.metrics['acc']:.3f}  forgetting {r.metrics.get('forgetting', float('nan')):.3f}  "
              f"({r.wall_time_s:.0f} s)")
        print("R:\n" + "\n".join(" ".join(f"{v:6.3f}" for v in row) for row in r.R))
        if name == "l2p":
            for kind in ("train", "test"):
                hists = r.extra[f"l2p_prompt_histogram_{kind}"]
                print(f"prompt selections per task ({kind}):")
                for task, h in hists.items():
                    print(f"  task {task}: {h}")
                tv = tv_matrix(hists)
                print(f"  total-variation distance between tasks' histograms: mean {tv[np.triu_indices(len(tv), 1)].mean():.3f}, "
                      f"min {tv[np.triu_indices(len(tv), 1)].min():.3f}")


if __name__ == "__main__":
    main()

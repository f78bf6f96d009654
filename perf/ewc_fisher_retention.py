"""Does the Fisher's structure matter on real data? K-FAC vs diagonal EWC vs L2 (Hiratani 2024's claim).

Permuted Fashion-MNIST with the latent-regression readout (Hiratani's MNIST
setting), 2 tasks, rho_b = 0 (the readout changes), over a grid of input
similarity rho_a. For each method and strength: transfer (score on task 2
after task 1: the same for all, since the penalty starts after task 1),
retention (score on task 1 after task 2) and plasticity (score on task 2
after task 2). Per method, the strength kept is the one with the best mean
retention among those whose mean plasticity stays within 0.05 of finetune's
("matched" learning of the new task).

    python perf/ewc_fisher_retention.py [--train-samples 10000] [--epochs 3] [--rho-a 0,0.5,1]
"""
from __future__ import annotations

import argparse

import pandas as pd

from clbench import make_strategy, make_stream, run

METHODS = {
    "finetune": [{}],
    "l2": [{"strength": s} for s in (0.01, 0.1, 1.0)],
    "ewc-diag": [{"strength": s, "fisher_samples": 300} for s in (1.0, 10.0, 100.0)],
    "ewc-full": [{"strength": s, "fisher_form": "kfac", "fisher_samples": 2000} for s in (1.0, 10.0, 100.0)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rho-a", default="0,0.5,1")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    rows = []
    for rho_a in [float(v) for v in args.rho_a.split(",")]:
        stream = make_stream("permuted-fashion-mnist", tasks=2, rho_a=rho_a, rho_b=0.0, readout="latent",
                             train_samples=args.train_samples, seed=args.seed)
        for method, settings in METHODS.items():
            for kw in settings:
                r = run(stream, make_strategy(method, epochs=args.epochs, optimizer=args.optimizer,
                                                 lr=args.lr, **kw), device="cpu", seed=args.seed,
                        progress=False)
                rows.append({"method": method, "strength": kw.get("strength", 0.0), "rho_a": rho_a,
                             "transfer": r.metrics["transfer"], "retention": r.metrics["retention"],
                             "plasticity": r.R[2][1]})
                print(f"rho_a={rho_a:<5} {method:<9} {kw.get('strength', ''):<6} transfer {rows[-1]['transfer']:+.3f} "
                      f"retention {rows[-1]['retention']:+.3f} plasticity {rows[-1]['plasticity']:+.3f}", flush=True)
    table = pd.DataFrame(rows)
    means = table.groupby(["method", "strength"])[["transfer", "retention", "plasticity"]].mean()
    print("\nMean over rho_a:\n" + means.to_string(float_format=lambda v: f"{v:+.3f}"))
    floor = means.loc["finetune", "plasticity"].iloc[0] - 0.05
    print(f"\nBest retention per method with plasticity >= {floor:+.3f} (finetune's - 0.05):")
    for method in METHODS:
        ok = means.loc[method]
        ok = ok[ok["plasticity"] >= floor]
        if ok.empty:
            print(f"  {method:<9} no strength keeps plasticity")
            continue
        best = ok["retention"].idxmax()
        per_rho = table[(table.method == method) & (table.strength == best)].set_index("rho_a")["retention"]
        print(f"  {method:<9} strength {best:<6g} retention {ok.loc[best, 'retention']:+.3f}  by rho_a: "
              + " ".join(f"{v:+.2f}" for v in per_rho))


if __name__ == "__main__":
    main()

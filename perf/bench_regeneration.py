"""A slice of each v2 suite's regeneration, batched against ``--batch off``, side by side in one run.

The slice: the first ``--trials`` trials (default 8: one batch of ``--batch auto``) of one strategy's search
(``--strategy``, default ewc-diag, which every v2 suite lists) under the suite's own protocol, data and
search space, run through the command line as a user would:

    clbench tune --suite SUITE --strategy ewc-diag --max-new-trials 8 --batch auto|off --store FRESH

Both sides use ``--jobs auto``: one worker process per idle core, one thread each. ``--batch auto`` shares
the 8 trials out among the workers, each training its share as one batched model; ``--batch off`` runs
them one run at a time in the same workers. The final seeds batch the same way. Both sides count every
core this process may use as idle (``$CLBENCH_THREADS``, unless set), so that the load one side leaves in
the load average does not give the next fewer workers. Prints one Markdown row per suite: both wall times and their ratio.

    python perf/bench_regeneration.py [--suites permuted-fashion-mnist,...] [--trials 8] [--strategy ewc-diag]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITES = ["permuted-fashion-mnist", "split-fashion-mnist-task", "split-fashion-mnist-domain",
          "split-fashion-mnist-class", "similarity-permuted-fashion-mnist"]


def tune_seconds(suite: str, strategy: str, trials: int, batch: str, store: Path) -> float:
    cmd = [sys.executable, "-m", "clbench", "tune", "--suite", suite, "--strategy", strategy, "--store", str(store),
           "--max-new-trials", str(trials), "--batch", batch, "--quiet"]
    # the same cores for both sides: the load average a side leaves behind would otherwise lower the next
    # side's count of idle cores (clbench.core.threads) for about a minute
    env = {**os.environ, "CLBENCH_THREADS": os.environ.get("CLBENCH_THREADS", str(len(os.sched_getaffinity(0))))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default=",".join(SUITES), type=lambda s: s.split(","))
    parser.add_argument("--strategy", default="ewc-diag")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"commit {commit}: {args.strategy}, the first {args.trials} trials of its search, fresh stores\n")
    print("| suite | `--batch off` | `--batch auto` | ratio |\n| --- | --- | --- | --- |", flush=True)
    root = Path(tempfile.mkdtemp(prefix="clbench-bench-regeneration-"))
    for suite in args.suites:
        off = tune_seconds(suite, args.strategy, args.trials, "off", root / suite / "off")
        auto = tune_seconds(suite, args.strategy, args.trials, "auto", root / suite / "auto")
        print(f"| {suite} v2 | {off:.0f} s | {auto:.0f} s | {off / auto:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Command-line interface: ``clbench run``, ``clbench list``, ``clbench pretrain``.

Every user error ends in one line ``clbench: error: ...`` on stderr and exit
status 2; no traceback.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings
from typing import Any, Sequence

from clbench.core.errors import ClbenchError
from clbench.core.io import atomic_write, check_output_file, partial_path, write_or_rescue

DEMO_GRID = (0.0, 0.5, 1.0)
DEMO_SEEDS = 3
DEMO_STRATEGIES: list[tuple[str, str, dict[str, Any]]] = [
    ("finetune", "finetune", {}),
    ("joint", "joint", {}),
    ("l2", "l2", {"strength": 0.1}),
    ("ewc-diag", "ewc-diag", {"strength": 1.0}),
    ("ewc-full", "ewc-full", {"strength": 1.0}),
    ("activity-gating a=0.2", "activity-gating", {"alpha": 0.2}),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise ClbenchError(f"{message} (see `{self.prog} --help`)")


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="train one strategy on one stream (no arguments: the teacher-student demo)",
        description="Train a strategy on a stream and print the score matrix R and summary metrics. "
                    "With neither --stream nor --strategy, runs the offline teacher-student demo: every "
                    "core strategy on a 3 x 3 grid of (rho_a, rho_b), printing mean transfer, retention and ACC.",
        epilog="examples:\n  clbench run\n  clbench run --stream teacher-student --strategy ewc-full "
               "--stream-arg rho_a=0.9 --stream-arg rho_b=0.1 --output result.json\n"
               "Training settings are strategy arguments: --strategy-arg epochs=5 --strategy-arg lr=0.01 "
               "(also batch_size, optimizer=sgd|adam|adamw); unset ones take the stream's defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", help="stream name (see `clbench list`); default teacher-student")
    p.add_argument("--strategy", help="strategy name (see `clbench list`); default finetune")
    p.add_argument("--model", help="model name; default: the stream's recommended model")
    p.add_argument("--stream-arg", action="append", metavar="KEY=VALUE", help="stream argument (repeatable)")
    p.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE", help="strategy argument (repeatable)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model argument (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, batch order and strategy; also the "
                   "stream's seed unless --stream-arg seed=N is given (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 autocast (CUDA)")
    p.add_argument("--output", metavar="FILE.json", help="write the full result as JSON")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, fewer when other processes keep cores busy; "
                        "$CLBENCH_THREADS); same seed + same threads = same R bit for bit")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    _add_continual(p)


def _add_continual(p) -> None:
    p.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="continual evaluation: also score the seen tasks and the next one every K training steps "
                        "(curves in the result; metrics min_acc, wc_acc, wf10, wp10, stability_gap); default off")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N",
                   help="test samples a task for --eval-every, a seeded subsample (default 1000)")


def _continual(args: argparse.Namespace) -> dict[str, Any]:
    """The run() options of --eval-every / --eval-samples (empty when off)."""
    from clbench.core.continual import check_options

    if args.eval_every is None:
        if args.eval_samples is not None:
            raise ClbenchError("--eval-samples applies to continual evaluation; give --eval-every K too")
        return {}
    every, samples = check_options(args.eval_every, args.eval_samples)
    return {"eval_every": every, "eval_samples": samples} if every else {}


def _add_list(sub) -> None:
    sub.add_parser("list", help="list streams, strategies and models with their arguments",
                   description="List every registered stream, strategy and model: a one-line description "
                               "and its arguments with defaults.")


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a small ViT backbone on CPU (for L2P offline)",
        description="Train a tiny timm ViT classifier on a dataset and save a checkpoint that L2P loads with "
                    "--strategy-arg backbone_checkpoint=PATH. DATASET is synthetic-digits (MNIST-format digits "
                    "generated here, no download) or any stream name (its tasks' training data; --classes keeps "
                    "some labels, e.g. a set disjoint from the stream L2P is evaluated on).",
        epilog="example:\n  clbench pretrain --dataset synthetic-digits --samples 10000 --epochs 3 --output vit.pth\n"
               "  clbench run --stream split-fashion-mnist --strategy l2p --strategy-arg backbone_checkpoint=vit.pth",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic-digits", help="synthetic-digits or a stream name (default synthetic-digits)")
    p.add_argument("--dataset-arg", action="append", metavar="KEY=VALUE", help="stream argument (repeatable)")
    p.add_argument("--classes", help="comma-separated labels to keep, e.g. 0,1,2,3,4 (default all)")
    p.add_argument("--samples", type=int, default=10000, help="number of synthetic digits (default 10000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--output", required=True, metavar="FILE.pth", help="where to save the checkpoint")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from clbench.core.engine import resolve_device
    from clbench.core.registry import parse_key_values
    from clbench.models.pretrain import pretrain

    try:
        classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    except ValueError:
        raise ClbenchError(f"--classes must be comma-separated integers, e.g. 0,1,2; got {args.classes!r}") from None
    from clbench.models.pretrain import check_settings

    check_settings(samples=args.samples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    try:  # pretrain makes the checkpoint's folder (as it always has); what cannot be written fails now
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    except OSError as e:
        raise ClbenchError(f"--output {args.output}: cannot create its folder ({e.strerror or e})") from None
    check_output_file(args.output)
    meta = pretrain(args.output, args.dataset, parse_key_values(args.dataset_arg, "--dataset-arg"), classes,
                    args.samples, args.epochs, args.batch_size, args.lr, args.patch_size, args.embed_dim, args.depth,
                    args.heads, args.seed, str(resolve_device(args.device)))
    print(f"saved {args.output}: {meta['backbone']} {meta['backbone_args']} on {meta['dataset']} "
          f"({meta['samples']} samples, classes {meta['classes']}), held-out accuracy {meta['heldout_accuracy']:.3f}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="list local datasets or download one",
                       description="Datasets are looked up in $CLBENCH_DATA (default ~/.cache/clbench), then "
                                   "system locations such as /usr/share/datasets/fashion-mnist; a stream given "
                                   "root=DIR looks there only.")
    action = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser, required=True)
    action.add_parser("list", help="each known dataset and where it was found (or 'missing')")
    download = action.add_parser("download", help="download a dataset with torchvision into $CLBENCH_DATA")
    download.add_argument("name", help="mnist, fashion-mnist, kmnist, cifar10 or cifar100")


def cmd_data(args: argparse.Namespace) -> int:
    from clbench.data import datasets as data

    if args.data_command == "list":
        print(f"cache: {data.cache_dir()}")
        for name, where in data.available():
            print(f"  {name:<15} {where}")
        return 0
    folder = data.fetch(args.name)
    loaded = data.load(args.name)
    print(f"{args.name}: {len(loaded['train_x'])} train / {len(loaded['test_x'])} test images in {folder}")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of runs into a results store (resumable)",
        description="Run every cell of a grid (streams x stream args x strategies x strategy args x seeds) "
                    "and write one JSON record per finished run into --store. Rerunning the same sweep runs "
                    "only the missing cells. The grid comes from a TOML file (see clbench/experiments/sweep.py) or from "
                    "inline lists: comma-separated values are grid axes.",
        epilog="examples:\n  clbench sweep --stream teacher-student --stream-arg rho_a=0,0.5,1 "
               "--stream-arg rho_b=0,0.5,1 --strategy finetune,ewc-full --seeds 0,1,2 --store results/ts\n"
               "  clbench sweep sweeps/teacher_student.toml --store results/ts --jobs 2\n"
               "  ray start --head --port 6379   # then, on any machine that reaches it:\n"
               "  clbench sweep sweeps/teacher_student.toml --store results/ts --executor ray --address HEAD:6379",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="sweep file (TOML)")
    p.add_argument("--stream", help="comma-separated stream names")
    p.add_argument("--strategy", help="comma-separated strategy names")
    p.add_argument("--stream-arg", action="append", metavar="KEY=V1,V2", help="stream argument or axis (repeatable)")
    p.add_argument("--strategy-arg", action="append", metavar="KEY=V1,V2", help="strategy argument or axis")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--store", required=True, help="results folder (one JSON per run)")
    p.add_argument("--jobs", type=int, default=1, help="parallel local processes (executor 'processes')")
    p.add_argument("--device", default=None, help="device for every run (default: the file's, else cpu)")
    p.add_argument("--batch", default="auto", metavar="auto|N|off",
                   help="train compatible cells (same stream shapes, strategy, settings; other seeds, numeric "
                        "arguments) together as one batched model: auto (default), at most N a batch, or off; "
                        "same records either way (executor 'processes')")
    p.add_argument("--executor", choices=("processes", "ray"), default="processes",
                   help="'processes': this machine (default); 'ray': one Ray task per cell "
                        "(pip install 'clbench[ray]')")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per run (default: the cores other processes leave idle, or "
                        "$CLBENCH_THREADS, shared among the jobs; "
                        "--cpus-per-run on Ray); same seed + same threads = same R bit for bit")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="Ray head to connect to (default: $RAY_ADDRESS, else a new local Ray instance)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray task asks for (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs each Ray task asks for (default 1 with --device cuda, else 0; fractions share a GPU)")
    p.add_argument("--quiet", action="store_true")
    _add_continual(p)


def cmd_sweep(args: argparse.Namespace) -> int:
    from clbench.core.registry import parse_key_values
    from clbench.experiments import sweep
    from clbench.experiments.store import Store

    if args.file:
        spec = sweep.load_spec(args.file)
    else:
        if not (args.stream and args.strategy):
            raise ClbenchError("give a sweep FILE, or --stream and --strategy (comma-separated lists)")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ClbenchError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
        spec = sweep.inline_spec(args.stream.split(","), parse_key_values(args.stream_arg, "--stream-arg"),
                                 args.strategy.split(","), parse_key_values(args.strategy_arg, "--strategy-arg"),
                                 seeds)
    if args.eval_every is not None:  # the command line's wins over the file's [continual]
        continual = _continual(args)
        spec.pop("continual", None)
        if continual:
            spec["continual"] = continual
    cells = sweep.expand(spec)
    store = Store(args.store)
    device = args.device or spec.get("device", "cpu")
    if args.executor != "ray" and (args.address or args.gpus_per_run is not None or args.cpus_per_run != 1.0):
        raise ClbenchError("--address, --cpus-per-run and --gpus-per-run apply to --executor ray only")
    if args.executor == "ray" and args.jobs != 1:
        raise ClbenchError("--jobs applies to local processes; with --executor ray, Ray runs as many cells at once "
                           "as its CPUs and GPUs allow (see --cpus-per-run, --gpus-per-run)")
    ran, skipped = sweep.run_sweep(cells, store, device=device, jobs=args.jobs, progress=not args.quiet,
                                   executor=args.executor, address=args.address, cpus_per_run=args.cpus_per_run,
                                   gpus_per_run=args.gpus_per_run, threads=args.threads, batch=args.batch)
    print(f"sweep: {len(cells)} cells, ran {ran}, skipped {skipped} already in {args.store}")
    return 0


def _add_suite_common(p) -> None:
    p.add_argument("--suite", required=True, help="suite name (see clbench list) or path of a suite .toml file")
    p.add_argument("--strategy", help="comma-separated strategy names (default: every strategy the suite lists)")
    p.add_argument("--store", help="results folder (default: clbench-results/SUITE)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///STORE/tuning.db)")
    p.add_argument("--jobs", default="auto", metavar="auto|N",
                   help="local worker processes for trials and final runs: auto (default) is one process per "
                        "idle core, one thread each, on the CPU (a batched strategy's trials and seeds shared out "
                        "among them, one batched model each), 1 on a GPU; N: that many")
    p.add_argument("--batch", default="auto", metavar="auto|N|off",
                   help="ask several trials at once (TPE with constant liar) and train their runs, and the final "
                        "seeds, together as batched models: auto (default: 8 trials at a time, shared out among the "
                        "jobs), N trials at a time, or off (--jobs trials at a time, one run each)")
    p.add_argument("--executor", choices=("processes", "ray"), default="processes",
                   help="'processes': this machine (default); 'ray': one Ray task per batch (or per run with "
                        "--batch off), as in `clbench sweep`")
    p.add_argument("--address", default=None, metavar="HOST:PORT", help="Ray head (default: $RAY_ADDRESS or local)")
    p.add_argument("--device", default=None, help="device for every run (default: the suite's, else cpu)")
    p.add_argument("--plugin", action="append", default=[], dest="suite_plugin", metavar="FILE.py|MODULE",
                   help="your strategy's file or module (same as the global --plugin)")
    p.add_argument("--quiet", action="store_true")


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune", help="choose a strategy's settings on a suite's validation split (Optuna; resumable)",
        description="Search each strategy's declared search space with the suite's trial budget (the same for "
                    "every strategy). The objective is the suite metric of the whole continual run on the "
                    "validation split; test sets are never used. A killed search resumes where it stopped; "
                    "several processes (or machines) may tune on one --storage at once. See docs/tuning.md.",
        epilog="example:\n  clbench tune --suite permuted-fashion-mnist --strategy ewc-diag,si",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_suite_common(p)
    p.add_argument("--max-new-trials", type=int, default=None, help="stop after this many new trials (resume later)")


def _add_benchmark(sub) -> None:
    p = sub.add_parser(
        "benchmark", help="tune a strategy, run its final rows and rank it on a suite's leaderboard",
        description="Run a suite's protocol for a strategy: tune it with the suite's budget (unless --set gives "
                    "its settings), run the chosen settings on the test sets over the suite's seeds, store the "
                    "records, and print the suite's leaderboard with the new row ranked among the committed ones "
                    "(rows not distinguishable from the best at 95% are marked). Also writes STORE/leaderboard.csv "
                    "and STORE/leaderboard.png.",
        epilog="examples:\n  clbench --plugin my_strategy.py benchmark --suite permuted-fashion-mnist --strategy mine\n"
               "  clbench benchmark --suite permuted-fashion-mnist --plugin my_strategy.py --strategy mine "
               "--set strength=10",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_suite_common(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed settings instead of tuning (repeatable)")


def _suite_setup(args: argparse.Namespace):
    from clbench.core.registry import load_plugin
    from clbench.experiments import suite as suites

    for plugin in args.suite_plugin:
        load_plugin(plugin)
    suite = suites.load(args.suite)
    if args.jobs != "auto":
        from clbench.experiments.batching import resolve_jobs

        args.jobs = resolve_jobs(args.jobs, "")  # a number: checked, and taken as it is
    if args.address and args.executor != "ray":
        raise ClbenchError("--address applies to --executor ray only (the Ray head to run trials on)")
    names = args.strategy.split(",") if args.strategy else [e["name"] for e in suite.spec.get("strategy", [])]
    if not names:
        raise ClbenchError(f"suite {suite.name} lists no strategies; pass --strategy NAME")
    store = args.store or os.path.join("clbench-results", suite.name)
    return suite, names, store


def cmd_tune(args: argparse.Namespace) -> int:
    from clbench.experiments import tune

    suite, names, store = _suite_setup(args)
    for name in names:
        t = tune.tune(suite, name, store, storage=args.storage, executor=args.executor, jobs=args.jobs,
                      address=args.address, device=args.device, max_new_trials=args.max_new_trials,
                      progress=not args.quiet, batch=args.batch)
        state = "" if t.get("finished", True) else " (unfinished: rerun to resume)"
        score = "-" if t["validation_score"] is None else f"{t['validation_score']:.4f}"
        print(f"{name}: chosen {t['chosen'] or t.get('note')}, validation {t['metric']} {score}, "
              f"{t['trials_counted']}/{t['budget_trials']} trials{state}; summary {t['path']}")
        if t.get("at_edge"):
            print(f"  warning: {edge_note(t['at_edge'], t['space'])}")
    return 0


def edge_note(edge: dict[str, str], space: dict[str, Any]) -> str:
    """What a search whose best setting lies at an end of its range should tell the user."""
    where = ", ".join(f"{arg} at the {side} end of {list(space[arg])}" for arg, side in sorted(edge.items()))
    return (f"the best setting lies at the edge of the searched range ({where}): the best may lie outside it; "
            "widen it with a [[strategy]] space in the suite (a new search)")


def cmd_benchmark(args: argparse.Namespace) -> int:
    from clbench import benchmark
    from clbench.core.registry import parse_key_values
    from clbench.reporting import report

    suite, names, store = _suite_setup(args)
    out = benchmark.benchmark(suite, names, store, settings=parse_key_values(args.set, "--set"),
                              executor=args.executor, jobs=args.jobs, address=args.address, device=args.device,
                              storage=args.storage, progress=not args.quiet, batch=args.batch)
    for name, t in out["tuning"].items():
        score = "-" if t["validation_score"] is None else f"{t['validation_score']:.4f}"
        how = t.get("note") or f"tuned, {t['trials_counted']} trials"
        print(f"{name}: settings {t['chosen'] or '(defaults)'} ({how}), validation {score}")
        if t.get("at_edge"):
            print(f"  warning: {edge_note(t['at_edge'], t['space'])}")
    print(f"\n{suite.name} v{suite.version} (protocol {suite.protocol_hash}), ranked by {out['metric']} on the test sets:")
    print(report.format_table(out["table"], out["metric"], highlight=names[0] if len(names) == 1 else None))
    if out["grid"]:  # a similarity grid: where the new strategy wins and loses, beside the averaged rank
        print("\n" + out["grid"])
    print(f"\nwrote {out['csv']} and {out['png']}")
    return 0


def _add_leaderboard(sub) -> None:
    p = sub.add_parser("leaderboard", help="build a leaderboard CSV from a results store",
                       description="One row per (stream config, strategy config): mean and 95%% CI over seeds of "
                                   "the metrics, costs and provenance. Schema: leaderboards/README.md.")
    p.add_argument("--store", required=True, help="results folder written by `clbench sweep`")
    p.add_argument("--output", required=True, help="CSV file to write")
    p.add_argument("--html", metavar="PAGE.html", help="also write one self-contained page: sortable table, "
                   "95%% CIs, provenance and plots inline")


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard

    check_output_file(args.output)
    if args.html:
        check_output_file(args.html, "--html")
    table = leaderboard.build(Store(args.store, create=False))
    if table.empty:
        raise ClbenchError(f"no records in {args.store}; run `clbench sweep ... --store {args.store}` first")
    leaderboard.write(table, args.output)
    print(f"wrote {args.output}: {len(table)} rows from {args.store}")
    if args.html:
        from clbench.reporting.report import page_from_store

        page, rows = page_from_store(args.store)
        write_or_rescue(args.html, page, "the page")
        print(f"wrote {args.html}: {rows} table rows")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="write PNG plots: a run's matrix or continual-evaluation curves, "
                                       "similarity maps, a leaderboard chart")
    kind = p.add_subparsers(dest="plot_kind", metavar="KIND", parser_class=_Parser, required=True)
    m = kind.add_parser("matrix", help="heatmap of R from a result JSON (clbench run --output)")
    m.add_argument("result")
    s = kind.add_parser("similarity", help="transfer, retention and retention minus finetune's over (rho_a, rho_b), "
                                           "one row per strategy, from a store; with continual evaluation also the "
                                           "stability gap (a column, and OUTPUT-stability-gap.png); runs that also "
                                           "differ in another stream argument get one file each "
                                           "(OUTPUT-readout-latent.png)")
    s.add_argument("--store", required=True)
    lb = kind.add_parser("leaderboard", help="bar chart of a leaderboard CSV")
    lb.add_argument("csv")
    lb.add_argument("--metric", default="acc")
    c = kind.add_parser("curves", help="each task's score against the training step, from a result JSON of "
                                       "`clbench run --eval-every K --output FILE.json`; boundaries and gaps marked")
    c.add_argument("result")
    for q in (m, s, lb, c):
        q.add_argument("--output", required=True, help="PNG file to write")


def _add_reproduce(sub) -> None:
    from clbench.reproduce import PAPERS

    p = sub.add_parser("reproduce", help="rerun a paper's experiments and write a report (Markdown + PNG figures)")
    p.add_argument("paper", choices=sorted(PAPERS), help="which paper")
    p.add_argument("--quick", action="store_true", help="the small size (seconds), for CI")
    p.add_argument("--output", default=None, help="report folder (default: reproductions/PAPER)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from clbench.reproduce import reproduce

    path = reproduce(args.paper, args.output or os.path.join("reproductions", args.paper), quick=args.quick,
                     progress=lambda name: print(f"running {name}", flush=True))
    print(f"report written to {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard, plots

    check_output_file(args.output)
    if args.plot_kind == "matrix":
        plots.accuracy_matrix(args.result, args.output)
    elif args.plot_kind == "curves":
        plots.continual_curves(args.result, args.output)
    elif args.plot_kind == "similarity":
        runs = leaderboard.runs_table(Store(args.store, create=False))
        if runs.empty:
            raise ClbenchError(f"no records in {args.store}; run `clbench sweep ... --store {args.store}` first")
        groups = plots.similarity_groups(runs)
        for group, part in groups.items():  # e.g. one figure per readout: X-readout-latent.png
            path = args.output if len(groups) == 1 else plots.group_path(args.output, group)
            check_output_file(path)
            plots.similarity_maps(part, path, group or None)
            if path != args.output:
                print(f"wrote {path}")
        if len(groups) > 1:
            return 0
        if runs["stability_gap"].notna().any():  # the sweep evaluated continually: the gap map beside it
            gap = plots.gap_map_path(args.output)
            check_output_file(gap)
            plots.stability_gap_maps(runs, gap)
            print(f"wrote {gap}")
    else:
        plots.leaderboard_chart(args.csv, args.output, args.metric)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clbench", description="Continual-learning benchmarks with controllable task similarity.")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                        help="import your own file or module first, so its @register_* classes are available "
                             "(repeatable; also $CLBENCH_PLUGINS, separated by ':')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    _add_list(sub)
    _add_data(sub)
    _add_sweep(sub)
    _add_tune(sub)
    _add_benchmark(sub)
    _add_leaderboard(sub)
    _add_plot(sub)
    _add_reproduce(sub)
    _add_pretrain(sub)
    return parser


def _format_args(obj: Any) -> str:
    from clbench.core.registry import arguments

    args = arguments(obj)
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "(none)"


def cmd_list(args: argparse.Namespace) -> int:
    from clbench.core import registry

    for kind, title in (("stream", "STREAMS"), ("strategy", "STRATEGIES"), ("model", "MODELS")):
        print(title)
        for name in registry.names(kind):
            obj = registry.lookup(kind, name)
            print(f"  {name:<22} {registry.describe(obj)}")
            print(f"  {'':<22}   args: {_format_args(obj)}")
            own = getattr(obj, "train_defaults", None) if kind == "strategy" else None
            if own:
                print(f"  {'':<22}   training defaults: {', '.join(f'{k}={v!r}' for k, v in own.items())} "
                      "(the rest from the stream)")
        print()
    print("Every strategy also takes epochs, lr, batch_size, optimizer (default: the strategy's training defaults "
          "where it lists them, else the stream's recommendation).")
    print()
    from clbench.experiments import suite as suites

    print(f"SUITES (clbench benchmark --suite NAME; files in {suites.SUITES_DIR})")
    for path in sorted(suites.SUITES_DIR.glob("*.toml")):
        s = suites.load(path)
        print(f"  {s.name:<36} v{s.version}  {s.spec.get('description', '').strip().splitlines()[0][:70]}")
    return 0


def _single_run(args: argparse.Namespace) -> int:
    import clbench
    from clbench.core.registry import arguments, lookup, parse_key_values

    stream_name = args.stream or "teacher-student"
    strategy_name = args.strategy or "finetune"
    if args.output:  # before any work: a result that cannot be written is lost
        check_output_file(args.output)
        check_output_file(partial_path(args.output), "--output (its partial-result file)")
    continual = _continual(args)
    stream_args = parse_key_values(args.stream_arg, "--stream-arg")
    strategy_args = parse_key_values(args.strategy_arg, "--strategy-arg")
    model_args = parse_key_values(args.model_arg, "--model-arg")
    if "seed" in arguments(lookup("stream", stream_name)):
        stream_args.setdefault("seed", args.seed)
    strategy = clbench.make_strategy(strategy_name, **strategy_args)
    stream = clbench.make_stream(stream_name, **stream_args)
    config = {"stream_args": stream_args, "strategy_args": strategy_args, "model": args.model or stream.defaults.model,
              "model_args": model_args or (stream.defaults.model_args if not args.model else {})}
    # with --output, the rows finished so far are kept in the partial file after every task, so that an
    # interruption (Ctrl-C) or a failure (a plugin's exception) keeps them; never in place of --output,
    # which holds only complete results
    partial = partial_path(args.output) if args.output else None

    def keep_rows(r) -> None:
        try:
            atomic_write(partial, r.json_text())
        except OSError:
            pass  # the final write says what is wrong, and rescues the result

    kept = lambda: f"; {args.output} was not touched" if os.path.exists(args.output) else ""  # noqa: E731
    try:
        result = clbench.run(stream, strategy, model_name=args.model, model_args=model_args, device=args.device,
                             seed=args.seed, precision=args.precision, progress=not args.quiet, config=config,
                             on_row=keep_rows if partial else None, **continual)
    except clbench.TrainingDiverged as e:
        if partial:
            _save(e.partial, partial)
            raise ClbenchError(f"{e} (the rows computed so far are in {partial}{kept()})") from None
        raise
    except BaseException:  # Ctrl-C, a plugin's bug: say where the finished rows are, then fail as before
        if partial and partial.exists():
            print(f"clbench: the rows computed so far are in {partial}{kept()}", file=sys.stderr)
        raise
    if args.output:
        _save(result, args.output)
        partial.unlink(missing_ok=True)
    if not args.quiet:
        _print_result(result)
    return 0


def _save(result, path: str | os.PathLike) -> None:
    """Write a result; if that fails after all (the disk filled up, the folder went away), keep it elsewhere."""
    write_or_rescue(path, result.json_text())


def _print_result(result) -> None:
    import numpy as np

    R = np.array(result.R)
    print(f"{result.config['strategy']} on {result.config['stream']} ({result.config['device']}, "
          f"{result.wall_time_s:.1f} s, peak {result.peak_memory_mb:.0f} MB, {result.parameter_count} parameters)")
    print("R (row i: after task i, row 0: before training; column j: task j):")
    for i, row in enumerate(R):
        print(f"  {i:>3} " + " ".join(f"{v:7.3f}" for v in row))
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    import clbench

    if args.output:
        check_output_file(args.output)
    rows = []
    cells = [(a, b) for a in DEMO_GRID for b in DEMO_GRID]
    seeds = [args.seed + k for k in range(DEMO_SEEDS)]
    if not args.quiet:
        print("clbench demo: Hiratani's teacher-student model, 2 tasks, (rho_a, rho_b) in "
              f"{list(DEMO_GRID)}^2, {len(DEMO_STRATEGIES)} strategies, seeds {seeds} (exact expected-loss training)")
    bar = tqdm(total=len(cells) * len(DEMO_STRATEGIES) * len(seeds), disable=True if args.quiet else None,
               unit="run", delay=1)
    from clbench.batched import Member, run_batched

    grid = list(itertools.product(cells, seeds))
    streams = [clbench.make_stream("teacher-student", rho_a=rho_a, rho_b=rho_b, seed=seed)
               for (rho_a, rho_b), seed in grid]
    for label, name, strategy_args in DEMO_STRATEGIES:  # each strategy's grid x seeds as one batched model
        members = [Member(stream, clbench.make_strategy(name, **strategy_args), seed)
                   for stream, (_, seed) in zip(streams, grid)]
        for ((rho_a, rho_b), seed), result in zip(grid, run_batched(members, device=args.device)):
            if isinstance(result, Exception):
                raise result
            rows.append({"strategy": label, "rho_a": rho_a, "rho_b": rho_b, "seed": seed, **result.metrics,
                         "wall_time_s": result.wall_time_s})
        bar.update(len(grid))
    bar.close()
    table = pd.DataFrame(rows)
    summary = table.groupby("strategy", sort=False)[["transfer", "retention", "acc"]].mean()
    corner = table[(table.rho_a == 1.0) & (table.rho_b == 0.0)].groupby("strategy", sort=False)["retention"].mean()
    summary["retention@(1,0)"] = corner
    if args.output:
        write_or_rescue(args.output, json.dumps(rows, indent=1), "the demo's results")
    if not args.quiet:
        print("\nMean over the grid and seeds (transfer = score on task 2 after task 1; retention = score on task 1 after "
              "task 2;\nscores are 1 - error/error_at_init; retention@(1,0) is the catastrophic corner "
              "rho_a=1, rho_b=0):")
        print(summary.to_string(float_format=lambda v: f"{v:8.3f}"))
        from clbench.streams.teacher_student import theory

        closed = [theory(a, b) for a, b in cells]
        print(f"\nTheory for finetune (Hiratani 2024), mean over this grid: transfer "
              f"{np.mean([c['transfer'] for c in closed]):.3f}, retention {np.mean([c['retention'] for c in closed]):.3f}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        from clbench.core.errors import cpu_limit

        torch.set_num_threads(cpu_limit("--threads", args.threads, "threads"))
    if not (args.stream or args.strategy or args.model or args.stream_arg or args.strategy_arg or args.model_arg
            or args.eval_every is not None or args.eval_samples is not None):
        return _demo(args)  # nothing chosen: the demo (a --model-arg alone means a single run, checked as one)
    return _single_run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """clbench's own warnings as one line each; others as Python prints them."""
    from clbench.core.errors import ClbenchWarning

    if issubclass(category, ClbenchWarning):
        print(f"clbench: warning: {message}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _choose_threads(args: argparse.Namespace) -> None:
    """For the commands that train, without --threads: $CLBENCH_THREADS, else no more torch threads than the
    cores other processes leave idle (clbench.core.threads), said in one line when that is fewer."""
    if args.command not in ("run", "sweep", "tune", "benchmark", "reproduce", "pretrain") or \
            getattr(args, "threads", None) is not None:
        return
    import torch

    from clbench.core.threads import current_load, default_threads, usable_cores

    chosen, current = default_threads(), torch.get_num_threads()
    if os.environ.get("CLBENCH_THREADS", "").strip():
        torch.set_num_threads(chosen)
    elif chosen < current:
        if not getattr(args, "quiet", False):
            print(f"clbench: other processes keep {usable_cores() - chosen} of {usable_cores()} CPU cores busy "
                  f"(load {current_load() or 0:.1f}); torch uses {chosen} thread(s) instead of {current} "
                  "(--threads N or CLBENCH_THREADS=N to choose)", file=sys.stderr)
        torch.set_num_threads(chosen)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from clbench.core.registry import load_plugin

    plugins = list(args.plugin) + [p for p in os.environ.get("CLBENCH_PLUGINS", "").split(":") if p]
    for plugin in plugins:
        load_plugin(plugin)
    _choose_threads(args)
    handlers = {"run": cmd_run, "list": cmd_list, "pretrain": cmd_pretrain, "data": cmd_data,
                "sweep": cmd_sweep, "leaderboard": cmd_leaderboard, "plot": cmd_plot,
                "tune": cmd_tune, "benchmark": cmd_benchmark, "reproduce": cmd_reproduce}
    if args.command is None:
        parser.print_help()
        return 0
    return handlers[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0, 2 for bad input, 1 for a bug, 130 when interrupted)."""
    import contextlib

    from clbench.core import progress

    parser = build_parser()
    from clbench.core.errors import ClbenchWarning

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", ClbenchWarning)
        try:
            args = parser.parse_args(argv)
            with progress.quiet() if getattr(args, "quiet", False) else contextlib.nullcontext():
                return _dispatch(parser, args)
        except ClbenchError as e:
            print(f"clbench: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # clbench.core.errors.Interrupted says what was kept
            print(f"clbench: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
            return 130
        except Exception as e:  # a bug (in clbench or a plugin): one line, and the way to the traceback
            if os.environ.get("CLBENCH_DEBUG"):
                raise
            print(f"clbench: internal error: {type(e).__name__}: {e} (this is a bug, in clbench or a plugin; "
                  "rerun with CLBENCH_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

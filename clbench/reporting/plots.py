"""Plots (matplotlib, written as PNG): a run's accuracy matrix and continual-evaluation curves, transfer/retention
and stability-gap maps over (rho_a, rho_b) per strategy, and a leaderboard chart."""
from __future__ import annotations

import json
import os
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clbench.core.errors import ClbenchError  # noqa: E402
from clbench.core.metrics import higher_is_better  # noqa: E402


def strategy_labels(table: pd.DataFrame) -> pd.Series:
    """'name' or 'name {args}' per row."""
    args = table["strategy_args"].str.replace('"', "")
    return table["strategy"] + args.where(args == "{}", " " + args).where(args != "{}", "")


def map_labels(table: pd.DataFrame) -> pd.Series:
    """Names for map panels: the strategy's name alone when each strategy has one config among these rows
    (a suite's tuned settings are in its tuning table), else 'name {args}'."""
    full = strategy_labels(table)
    one_each = (full.groupby(table["strategy"]).nunique() == 1).all()
    return table["strategy"].astype(str) if one_each else full


def _read_text(path: str | os.PathLike, what: str, fix: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ClbenchError(f"{what} {path} not found; {fix}") from None
    except IsADirectoryError:
        raise ClbenchError(f"{what} {path} is a folder; {fix}") from None
    except UnicodeDecodeError:
        raise ClbenchError(f"{what} {path} is not a text file; {fix}") from None
    except OSError as e:
        raise ClbenchError(f"cannot read {what} {path} ({e.strerror or e})") from None


def load_result(path: str | os.PathLike) -> dict:
    """A run's result JSON (``clbench run --output``), checked: R must be a (T+1) x T matrix of numbers."""
    fix = "give the JSON file that `clbench run ... --output FILE.json` writes"
    text = _read_text(path, "result file", fix)
    try:
        result = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClbenchError(f"{path} is not JSON ({e.msg}, line {e.lineno}); {fix}") from None
    R = result.get("R") if isinstance(result, dict) else None
    ok = (isinstance(R, list) and len(R) >= 2 and all(isinstance(row, list) for row in R)
          and len({len(row) for row in R}) == 1 and len(R) == len(R[0]) + 1
          and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for row in R for v in row))
    if not ok:
        raise ClbenchError(f"{path} is not a run's result: it has no score matrix R of (T+1) x T numbers; {fix}")
    return result


def accuracy_matrix(result_json: str | os.PathLike, output: str | os.PathLike) -> None:
    """Heatmap of R: rows = after training task i (0 = before training), columns = task evaluated."""
    result = load_result(result_json)
    R = np.array([[np.nan if v is None else v for v in row] for row in result["R"]], dtype=float)
    T = R.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * (T + 1)))
    image = ax.imshow(R, cmap="viridis", vmin=min(0.0, np.nanmin(R)), vmax=1.0, aspect="auto")
    for i in range(T + 1):
        for j in range(T):
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w" if R[i, j] < 0.6 else "k", fontsize=9)
    ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
    ax.set_yticks(range(T + 1), ["init"] + [str(i) for i in range(1, T + 1)])
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after training task")
    cfg = result.get("config", {})
    acc = (result.get("metrics") or {}).get("acc", float("nan"))
    ax.set_title(f"{cfg.get('strategy', '?')} on {cfg.get('stream', '?')}\nACC {acc:.3f}")
    fig.colorbar(image, ax=ax, label="score (accuracy or 1 - error/error_at_init)")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def similarity_grids(runs: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per strategy config (named by :func:`map_labels`): the mean of ``metric`` over seeds (and diverged runs left out) on
    the (rho_a, rho_b) grid, rho_a down the index, rho_b across the columns."""
    args = runs["stream_args"].map(json.loads)
    if not args.map(lambda a: "rho_a" in a and "rho_b" in a).all():
        raise ClbenchError("similarity maps need runs whose stream args set both rho_a and rho_b")
    runs = runs.assign(rho_a=args.map(lambda a: a["rho_a"]), rho_b=args.map(lambda a: a["rho_b"]),
                       label=map_labels(runs))
    if "diverged" in runs:
        runs = runs[~runs["diverged"].astype(bool)]
    return {label: runs[runs["label"] == label].pivot_table(index="rho_a", columns="rho_b", values=metric,
                                                             aggfunc="mean", dropna=False)
            for label in sorted(runs["label"].unique())}


def _grid_panel(ax, grid: pd.DataFrame, title: str, **imshow) -> Any:
    image = ax.imshow(grid.to_numpy(dtype=float), origin="lower",
                      extent=(-0.5, len(grid.columns) - 0.5, -0.5, len(grid.index) - 0.5), **imshow)
    ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
    ax.set_xlabel("readout similarity rho_b")
    ax.set_ylabel("input similarity rho_a")
    ax.set_title(title, fontsize=9)
    return image


def similarity_groups(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The runs split by the stream arguments besides rho_a and rho_b that vary among them (e.g. the readout):
    ``{"readout=latent": runs, ...}``, or ``{"": runs}`` when only the grid varies. Each is one map figure."""
    args = runs["stream_args"].map(json.loads)
    keys = sorted({k for a in args for k in a} - {"rho_a", "rho_b"})
    varying = [k for k in keys if args.map(lambda a, k=k: json.dumps(a.get(k))).nunique() > 1]
    if not varying:
        return {"": runs}
    name = args.map(lambda a: ", ".join(f"{k}={a.get(k)}" for k in varying))
    return {n: runs[name == n] for n in sorted(name.unique())}


def _write_values(ax, grid: pd.DataFrame, dark: Any) -> None:
    """Each cell's value in it (white where ``dark(value)``), '-' where there is none."""
    for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="w" if not np.isnan(v) and dark(v) else "k")


def map_columns(runs: pd.DataFrame) -> list[str]:
    """The columns of :func:`similarity_maps` for these runs."""
    labels = set(map_labels(runs))
    return (["transfer", "retention"] + (["retention minus finetune"] if "finetune" in labels and len(labels) > 1 else [])
            + (["stability gap"] if "stability_gap" in runs and runs["stability_gap"].notna().any() else []))


def map_grids(runs: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
    """What :func:`similarity_maps` draws: ``{column: {strategy config: (rho_a x rho_b) grid of means}}``."""
    columns = map_columns(runs)
    grids = {"transfer": similarity_grids(runs, "transfer"), "retention": similarity_grids(runs, "retention")}
    if "retention minus finetune" in columns:
        base = grids["retention"]["finetune"]
        grids["retention minus finetune"] = {k: g - base for k, g in grids["retention"].items()}
    if "stability gap" in columns:
        grids["stability gap"] = similarity_grids(runs, "stability_gap")
    return grids


def similarity_maps(runs: pd.DataFrame, output: str | os.PathLike, title: str | None = None) -> None:
    """One row per strategy config over the (rho_a, rho_b) grid, means over seeds, each cell's value written in
    it: transfer and retention on one shared scale, retention minus finetune's (one symmetric scale for all rows),
    and the stability gap (one scale) when the runs evaluated continually. Runs that also differ in another
    stream argument (e.g. the readout) belong in separate figures: see :func:`similarity_groups`."""
    grids = map_grids(runs)
    columns = list(grids)
    labels = sorted(grids["transfer"], key=lambda label: (label != "finetune", label))

    def span(column: str) -> tuple[float, float]:
        values = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids[column].values()])
        values = values[np.isfinite(values)]
        top = float(np.abs(values).max()) if values.size else 1.0
        if column == "stability gap":
            return 0.0, max(top, 1e-3)
        if column == "retention minus finetune":
            return -max(top, 0.05), max(top, 0.05)
        return -1.0, 1.0  # scores: 1 is perfect, 0 is the untrained model, below 0 worse than it

    scales = {c: span(c) for c in columns}
    scales["transfer"] = scales["retention"]  # the one shared scale of the two scores
    cmaps = {"transfer": "RdBu", "retention": "RdBu", "retention minus finetune": "PuOr", "stability gap": "magma_r"}
    fig, axes = plt.subplots(len(labels), len(columns), figsize=(2.7 * len(columns) + 1.8, 2.4 * len(labels) + 1.4),
                             squeeze=False, layout="constrained")
    images = {}
    for r, label in enumerate(labels):
        for c, column in enumerate(columns):
            ax, (low, high) = axes[r, c], scales[column]
            grid = grids[column][label]
            images[column] = _grid_panel(ax, grid, column if r == 0 else "", cmap=cmaps[column], vmin=low, vmax=high)
            far = (lambda v: v > low + 0.6 * (high - low)) if column == "stability gap" else \
                (lambda v: abs(v) > 0.6 * high)
            _write_values(ax, grid, far)
            ax.set_ylabel(f"{textwrap.fill(label, 26)}\n\ninput similarity rho_a" if c == 0 else "")
            if r < len(labels) - 1:
                ax.set_xlabel("")
    for c, column in enumerate(columns):
        fig.colorbar(images[column], ax=axes[:, c], location="bottom", shrink=0.85, aspect=25, label=column)
    fig.suptitle(f"{title + chr(10) if title else ''}Over task similarity: input rho_a (rows), readout rho_b (columns); means over seeds")
    fig.savefig(output, dpi=90)
    plt.close(fig)


def group_path(output: str | os.PathLike, group: str) -> str:
    """Where a group's maps go (see :func:`similarity_groups`): X-readout-latent.png for group 'readout=latent'."""
    root, ext = os.path.splitext(str(output))
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in group.replace("=", "-").replace(", ", "-"))
    return f"{root}-{tag}{ext or '.png'}"


def gap_map_path(output: str | os.PathLike) -> str:
    """Where ``clbench plot similarity --output X.png`` writes the stability-gap maps: X-stability-gap.png."""
    root, ext = os.path.splitext(str(output))
    return f"{root}-stability-gap{ext or '.png'}"


def stability_gap_maps(runs: pd.DataFrame, output: str | os.PathLike) -> None:
    """The mean stability gap over seeds (continual evaluation, clbench.core.metrics) on the (rho_a, rho_b)
    grid: one panel per strategy config, one colour scale for all, each cell's value written in it."""
    if "stability_gap" not in runs or not runs["stability_gap"].notna().any():
        raise ClbenchError("these runs have no stability gap: it needs continual evaluation; rerun the sweep with "
                           "[continual] eval_every = K (or --eval-every K)")
    grids = similarity_grids(runs, "stability_gap")
    values = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids.values()])
    low, high = min(0.0, float(np.nanmin(values))), max(float(np.nanmax(values)), 1e-3)
    per_row = min(len(grids), 4)
    rows = -(-len(grids) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.3 * per_row + 1.2, 3.1 * rows + 0.9), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(grids):]:
        ax.set_visible(False)
    for ax, (label, grid) in zip(axes.flat, grids.items()):
        image = _grid_panel(ax, grid, textwrap.fill(label, 44), cmap="magma_r", vmin=low, vmax=high)
        _write_values(ax, grid, lambda v: v > low + 0.6 * (high - low))
    fig.colorbar(image, ax=axes, label="stability gap (mean over seeds)", shrink=0.8)
    fig.suptitle("Stability gap over task similarity")
    fig.savefig(output, dpi=110)
    plt.close(fig)


def leaderboard_chart(csv: str | os.PathLike, output: str | os.PathLike, metric: str = "acc") -> None:
    """Horizontal bars of a leaderboard metric with 95% CI, averaged over stream configs per strategy config."""
    import io

    fix = "give a CSV that `clbench leaderboard` writes"
    try:
        table = pd.read_csv(io.StringIO(_read_text(csv, "leaderboard", fix)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ClbenchError(f"{csv} is not a readable CSV ({e}); {fix}") from None
    if "strategy" not in table or "strategy_args" not in table or table.empty:
        raise ClbenchError(f"{csv} is not a leaderboard (no strategy rows); {fix}")
    if f"{metric}_mean" not in table:
        raise ClbenchError(f"{csv} has no column {metric}_mean; pick one of "
                           f"{', '.join(c[:-5] for c in table.columns if c.endswith('_mean'))}")
    draw_leaderboard(table, output, metric, f"Leaderboard: {os.path.basename(str(csv))}")


def draw_leaderboard(table: pd.DataFrame, output: str | os.PathLike, metric: str = "acc",
                     title: str = "Leaderboard") -> None:
    """The bar chart of :func:`leaderboard_chart` from a leaderboard table in memory."""
    table = table.assign(label=strategy_labels(table))
    agg = table.groupby("label").agg(mean=(f"{metric}_mean", "mean"), ci=(f"{metric}_ci95", "mean"))
    agg = agg.sort_values("mean", ascending=higher_is_better(metric))  # the best bar on top
    width = 4.5 + 0.075 * max(len(label) for label in agg.index)  # room for the longest label
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(agg) + 1.8), layout="constrained")
    ax.barh(agg.index, agg["mean"], xerr=agg["ci"].fillna(0), color="tab:blue", capsize=3)
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_xlabel(f"{metric} ({better} is better), mean over stream configs\n(error bars: mean 95% CI over seeds)")
    ax.set_ylabel("strategy")
    fig.suptitle(title)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def continual_curves(result_json: str | os.PathLike, output: str | os.PathLike) -> None:
    """Each task's score against the training step (continual evaluation), task boundaries dashed, and at each
    boundary the stability gap of every old task drawn from its score before the boundary down to its minimum
    while the new task trains (the just-finished task's gap labelled)."""
    from clbench.core import metrics

    result = load_result(result_json)
    c = result.get("curves")
    if not isinstance(c, dict) or not all(k in c for k in ("step", "score", "boundaries")):
        raise ClbenchError(f"{result_json} has no continual-evaluation curves; rerun it with "
                           "`clbench run ... --eval-every K --output FILE.json`")
    step = np.asarray(c["step"], dtype=float)
    score = np.array([[np.nan if v is None else v for v in row] for row in c["score"]], dtype=float)
    boundaries = np.asarray(c["boundaries"], dtype=float)
    G = metrics.stability_gaps(step, score, boundaries)
    T = score.shape[1]
    colors = plt.get_cmap("tab10" if T <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 4.2), layout="constrained")
    for j in range(T):
        ax.plot(step, score[:, j], color=colors(j % colors.N), lw=1.3, label=f"task {j + 1}")
    for k in range(1, T):
        ax.axvline(boundaries[k], color="0.5", ls="--", lw=0.8)
        end = boundaries[k + 1] if k + 1 < T else np.inf
        during = np.flatnonzero((step > boundaries[k]) & (step <= end))
        for j in range(k):
            if np.isnan(G[k, j]) or len(during) == 0:
                continue
            at = during[np.nanargmin(score[during, j])]
            ax.annotate("", xy=(step[at], score[at, j]), xytext=(step[at], score[at, j] + G[k, j]),
                        arrowprops={"arrowstyle": "->", "color": colors(j % colors.N), "lw": 1.0})
            if j == k - 1:
                ax.annotate(f"gap {G[k, j]:.2f}", xy=(step[at], score[at, j]), xytext=(-4, -12),
                            textcoords="offset points", fontsize=8, ha="right", color=colors(j % colors.N))
    ax.set_xlabel(f"training step (evaluated every {c.get('eval_every', '?')} steps on "
                  f"{c.get('eval_samples', '?')} test samples a task)")
    ax.set_ylabel("score (accuracy or 1 - error/error_at_init)")
    cfg, m = result.get("config", {}), result.get("metrics") or {}
    fmt = lambda key: "-" if m.get(key) is None else f"{m[key]:.3f}"  # noqa: E731
    ax.set_title(f"{cfg.get('strategy', '?')} on {cfg.get('stream', '?')}: ACC {fmt('acc')}, "
                 f"min-ACC {fmt('min_acc')}, WC-ACC {fmt('wc_acc')}, mean gap {fmt('stability_gap')}", fontsize=10)
    ax.legend(fontsize=8, ncol=min(T, 5), loc="lower right")
    fig.savefig(output, dpi=120)
    plt.close(fig)

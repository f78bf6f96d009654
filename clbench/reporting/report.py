"""A suite's ranked leaderboard: one row per strategy config, a paired test against the best row,
a chart, and a self-contained HTML page (sortable table, confidence intervals, provenance, plots inline).

Ranking: per seed, the metric averaged over the suite's stream configs; rows are ranked by the mean over
seeds. A row is *tied with the best* when a two-sided paired t-test over the seeds both rows share does not
reject equal means at 95% (Student 1908; pairing by seed removes the variation the seeds share: the same
stream data, permutations and batch orders).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np
import pandas as pd

from clbench.core import metrics as cl_metrics
from clbench.core.errors import ClbenchError
from clbench.reporting.leaderboard import CONTINUAL, T95, ci95


def _t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.96


def paired_tied(best: pd.Series, other: pd.Series) -> bool | None:
    """True if ``other`` is not distinguishable from ``best`` at 95% (paired t over shared seeds); None if
    fewer than 2 shared seeds."""
    shared = best.index.intersection(other.index)
    if len(shared) < 2:
        return None
    d = (best[shared] - other[shared]).to_numpy(dtype=float)
    sd = d.std(ddof=1)
    if sd == 0:
        return bool(d.mean() == 0)
    return bool(abs(d.mean()) <= _t95(len(d) - 1) * sd / math.sqrt(len(d)))


def ranked(runs: pd.DataFrame, metric: str = "acc", higher_is_better: bool | None = None) -> pd.DataFrame:
    """One row per (strategy, strategy_args), best first, from ``leaderboard.runs_table`` rows; which way is
    better comes from clbench.core.metrics.direction unless ``higher_is_better`` says."""
    if higher_is_better is None:
        higher_is_better = cl_metrics.higher_is_better(metric)
    if runs.empty:
        raise ClbenchError("no runs to rank")
    if "protocol_hash" in runs and runs["protocol_hash"].nunique(dropna=False) > 1:
        raise ClbenchError("these runs come from different suite protocols "
                           f"({', '.join(sorted(runs['protocol_hash'].astype(str).unique()))}); rank one at a time")
    per_seed = runs.groupby(["strategy", "strategy_args", "seed"])[metric].mean()
    rows = []
    for (strategy, args), group in runs.groupby(["strategy", "strategy_args"], sort=False):
        seeds = per_seed.loc[(strategy, args)]
        averaged = seeds.dropna()  # a seed without the metric (a diverged run) is not averaged, nor counted
        row = {"strategy": strategy, "strategy_args": args, f"{metric}_mean": float(averaged.mean()),
               f"{metric}_ci95": ci95(averaged), "n_seeds": int(averaged.size),
               "diverged_seeds": int(seeds.size - averaged.size), "stream_configs": group["stream_args"].nunique()}
        for m in ("forgetting_last", "forgetting", "bwt"):
            if m in group and m != metric and group[m].notna().any():
                row[f"{m}_mean"] = float(group.groupby("seed")[m].mean().mean())
        for m in CONTINUAL:  # a suite that evaluates continually: its worst-case scores beside the metric
            if m in group and m != metric and group[m].notna().any():
                by_seed = group.groupby("seed")[m].mean()
                row[f"{m}_mean"], row[f"{m}_ci95"] = float(by_seed.mean()), ci95(by_seed)
        for col in ("validation_score", "tuning_trials", "tuned", "suite", "suite_version", "protocol_hash",
                    "git_commit", "clbench_version", "device"):
            if col in group:
                row[col] = ";".join(sorted(set(group[col].astype(str))))
        row["wall_time_s_mean"] = float(group["wall_time_s"].mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table["diverged_seeds"].any():  # the column flags rows with diverged seeds, so it is there only then
        table = table.drop(columns="diverged_seeds")
    sign = 1 if higher_is_better else -1
    table = table.sort_values(f"{metric}_mean", ascending=not higher_is_better, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    best = per_seed.loc[(table.loc[0, "strategy"], table.loc[0, "strategy_args"])] * sign
    tied = [paired_tied(best, per_seed.loc[(r.strategy, r.strategy_args)] * sign) for r in table.itertuples()]
    table.insert(3, "tied_with_best", ["best" if i == 0 else ("n/a" if t is None else ("yes" if t else "no"))
                                       for i, t in enumerate(tied)])
    return table


def grid_comparison(runs: pd.DataFrame, strategy: str, metric: str = "acc",
                    higher_is_better: bool | None = None) -> str:
    """Where over a suite's stream configs (a similarity grid) ``strategy`` wins and loses against each other
    strategy: at every config, a paired t-test over shared seeds at 95% (clbench.reporting.report.paired_tied);
    configs are named by the stream arguments that vary. Empty when the runs hold one config."""
    if higher_is_better is None:
        higher_is_better = cl_metrics.higher_is_better(metric)
    configs = sorted(runs["stream_args"].unique())
    if len(configs) < 2 or strategy not in set(runs["strategy"]):
        return ""
    parsed = {c: json.loads(c) for c in configs}
    varying = [k for k in parsed[configs[0]] if len({json.dumps(p.get(k)) for p in parsed.values()}) > 1]
    name = lambda c: " ".join(f"{k}={parsed[c].get(k)}" for k in varying)  # noqa: E731
    sign = 1 if higher_is_better else -1
    per_seed = runs.groupby(["strategy", "strategy_args", "stream_args", "seed"])[metric].mean() * sign
    mine = runs.loc[runs["strategy"] == strategy, "strategy_args"].iloc[0]
    lines = [f"{strategy} over the {len(configs)} stream configs ({metric}; paired t-test over seeds at 95%):"]
    for (other, args), _ in runs.groupby(["strategy", "strategy_args"], sort=False):
        if other == strategy:
            continue
        verdict: dict[str, list[str]] = {"wins": [], "loses": [], "ties": []}
        for c in configs:
            try:
                a, b = per_seed.loc[(strategy, mine, c)], per_seed.loc[(other, args, c)]
            except KeyError:
                continue
            tied = paired_tied(a, b)
            key = "ties" if tied in (True, None) else ("wins" if a.mean() > b.mean() else "loses")
            verdict[key].append(name(c))
        label = other + ("" if args == "{}" else " " + args.replace('"', ""))
        parts = [f"{k} at {', '.join(v)}" if k != "ties" else f"ties at {len(v)}" for k, v in verdict.items() if v]
        lines.append(f"  vs {label}: " + "; ".join(parts))
    return "\n".join(lines)


def format_table(table: pd.DataFrame, metric: str = "acc", highlight: str | None = None) -> str:
    """Plain-text table: '*' marks rows not distinguishable from the best, '>' the highlighted strategy."""
    lines = [f"{'':2}{'rank':>4}  {'strategy':<42} {metric + ' (95% CI)':>18} {'seeds':>5}  {'val':>6}  trials"]
    for r in table.itertuples():
        mark = ("*" if r.tied_with_best in ("best", "yes") else " ") + (">" if r.strategy == highlight else " ")
        label = r.strategy + ("" if r.strategy_args == "{}" else " " + r.strategy_args.replace('"', ""))
        if len(label) > 42:
            label = label[:39] + "..."
        val = getattr(r, "validation_score", "")
        lines.append(f"{mark}{r.rank:>4}  {label:<42} {getattr(r, f'{metric}_mean'):>8.4f} ± "
                     f"{getattr(r, f'{metric}_ci95'):<7.4f} {r.n_seeds:>5}  {val:>6}  {getattr(r, 'tuning_trials', '')}"
                     + (f"  ! {r.diverged_seeds} seed(s) diverged, not averaged" if getattr(r, "diverged_seeds", 0) else ""))
    lines.append("* = not distinguishable from the best at 95% (paired t-test over seeds); > = the new strategy")
    return "\n".join(lines)


def chart(table: pd.DataFrame, output: str, metric: str = "acc", highlight: str | None = None,
          title: str = "") -> None:
    """Horizontal bars with 95% CIs, best on top; tied rows dark, others light, the highlighted one orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.strategy + ("" if r.strategy_args == "{}" else " " + r.strategy_args.replace('"', ""))[:60]
              for r in table.itertuples()]
    colors = ["tab:orange" if r.strategy == highlight else
              ("tab:blue" if r.tied_with_best in ("best", "yes") else "lightsteelblue") for r in table.itertuples()]
    width = 4.5 + 0.07 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 0.42 * len(table) + 1.8), layout="constrained")
    y = np.arange(len(table))[::-1]
    ax.barh(y, table[f"{metric}_mean"], xerr=table[f"{metric}_ci95"].fillna(0), color=colors, capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    better = "higher" if cl_metrics.higher_is_better(metric) else "lower"
    ax.set_xlabel(f"{metric} ({better} is better), mean over seeds (bars: 95% CI)\n"
                  "dark: not distinguishable from the best")
    fig.suptitle(title or "Suite leaderboard")
    fig.savefig(output, dpi=110)
    plt.close(fig)


_SORT_JS = """
function sortBy(col, numeric, desc) {
  const body = document.querySelector('#board tbody');
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    const c = numeric ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
    return desc ? -c : c;
  });
  rows.forEach(r => body.appendChild(r));
  document.querySelector('#board').dataset.sortedBy = col;
}
document.querySelectorAll('#board th').forEach((th, i) => {
  th.addEventListener('click', () => {
    const desc = th.dataset.desc !== 'true';
    th.dataset.desc = desc;
    sortBy(i, th.dataset.numeric === 'true', desc);
  });
});
sortBy(0, true, false);
"""


def readable(value: Any) -> str:
    """A provenance value as text: ``k = v, ...`` for a table, ``a, b`` for a list, numbers to 4 digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k} = {readable(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value) if not any(isinstance(v, (list, dict)) for v in value) \
            else "[" + "; ".join(readable(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def tuning_rows(tuning: list[dict[str, Any]]) -> list[list[str]]:
    """One row per tuned strategy: chosen settings, validation score, trials counted / budget, searched space."""
    rows = []
    for t in sorted(tuning, key=lambda t: t["strategy"]):
        space = {k: f"{v[0]} [{readable(list(v[1:]))}]" for k, v in (t.get("space") or {}).items()}
        score = t.get("validation_score")
        chosen = readable(t.get("chosen")) if t.get("chosen") else t.get("note", "-")
        if t.get("at_edge"):
            chosen += " (at the " + ", ".join(f"{side} edge of {arg}" for arg, side in sorted(t["at_edge"].items())) + ")"
        rows.append([t["strategy"], chosen,
                     "-" if score is None else f"{score:.4f}",
                     f"{t.get('trials_counted', 0)} / {t.get('budget_trials', '-')}",
                     readable(space), readable(t.get("fixed_args"))])
    return rows


def html_page(table: pd.DataFrame, title: str, provenance: dict[str, Any], images: dict[str, bytes],
              metric: str = "acc", tuning: list[dict[str, Any]] | None = None) -> str:
    """One self-contained page: the table (click a header to sort), each strategy's tuning, provenance, PNG plots
    as base64."""
    cols = [c for c in table.columns if not c.endswith("_ci95")]
    esc = html.escape
    head = "".join(f'<th data-numeric="{str(pd.api.types.is_numeric_dtype(table[c])).lower()}">{esc(c)}</th>'
                   for c in cols)
    body = []
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            ci = r.get(c[:-5] + "_ci95") if c.endswith("_mean") else None
            if isinstance(v, float):
                shown = "" if math.isnan(v) else f"{v:.4f}"
                if ci is not None and not (isinstance(ci, float) and math.isnan(ci)):
                    shown += f" ± {ci:.4f}"
            else:
                shown = str(v)
            cls = ' class="tied"' if c == "tied_with_best" and v in ("best", "yes") else ""
            cells.append(f'<td data-v="{esc(str(v))}"{cls}>{esc(shown)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    prov = "".join(f"<tr><th>{esc(k)}</th><td>{esc(readable(v))}</td></tr>" for k, v in provenance.items())
    tuned = ""
    if tuning:
        heads = ("strategy", "chosen settings", "validation score", "trials / budget", "searched", "fixed")
        tuned = ('<h2>Tuning</h2><table id="tuning"><thead><tr>' + "".join(f"<th>{h}</th>" for h in heads)
                 + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                                                    for row in tuning_rows(tuning)) + "</tbody></table>")
    figs = "".join(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                   f"<figcaption>{esc(name)}</figcaption></figure>" for name, png in images.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; }} #board th {{ cursor: pointer; background: #eef; }}
td.tied {{ font-weight: bold; color: #084; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Ranked by {esc(metric)} (mean over seeds ± 95% CI half-width, Student t). <code>tied_with_best</code>:
whether a paired t-test over seeds (95%) can tell the row from the best. Click a column header to sort.</p>
<table id="board"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{tuned}
<h2>Provenance</h2><table>{prov}</table>
<h2>Plots</h2>{figs}
<script>{_SORT_JS}</script>
</body></html>
"""


def png_bytes(draw: Callable[[str], None]) -> bytes:
    """Call ``draw(path)`` (a plot writer) on a temporary file and return the PNG bytes."""
    fd, path = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        draw(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def page_from_store(store_dir: str | os.PathLike, title: str | None = None) -> tuple[str, int]:
    """The HTML page of a results store, and its number of table rows: the ranked suite table for suite records,
    else the per-config leaderboard rows."""
    from pathlib import Path

    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard, plots

    store = Store(store_dir)
    runs = leaderboard.runs_table(store)
    if runs.empty:
        raise ClbenchError(f"no records in {store_dir}; run `clbench benchmark` or `clbench sweep` into it first")
    records = list(store.records())
    suite = records[0]["cell"].get("suite")
    provenance: dict[str, Any] = {"store": str(store_dir), "runs": len(runs)}
    for col in ("clbench_version", "git_commit", "device", "dataset"):
        provenance[col] = ", ".join(sorted(set(runs[col].astype(str))))
    images = {}
    if suite:
        metric = suite.get("metric", "acc")
        table = ranked(runs, metric)
        provenance.update(suite=suite["name"], suite_version=str(suite["version"]),
                          protocol_hash=suite["protocol_hash"], seeds=sorted(set(runs["seed"].tolist())))
        tuning = [json.loads(path.read_text()) for path in sorted(Path(store_dir, "tuning").glob("*.json"))]
        if tuning:
            first = tuning[0]
            provenance.update(validation=first.get("validation"), tuning_seeds=first.get("tuning_seeds"))
        images["ranked chart"] = png_bytes(lambda out: chart(table, out, metric, title=title or suite["name"]))
    else:
        metric = "acc"
        table = leaderboard.build(store)
        table.insert(0, "row", range(1, len(table) + 1))
        images["leaderboard chart"] = png_bytes(lambda out: plots.draw_leaderboard(table.drop(columns=["row"]), out))
    args = runs["stream_args"].map(json.loads)
    if args.map(lambda a: "rho_a" in a and "rho_b" in a).all() and "transfer" in runs and runs["transfer"].notna().any():
        for group, part in plots.similarity_groups(runs).items():
            name = f"{group + ': ' if group else ''}{', '.join(plots.map_columns(part))} over (rho_a, rho_b)"
            heading = f"{title or (suite['name'] if suite else 'runs')}{' · ' + group if group else ''}"
            images[name] = png_bytes(lambda out, part=part, heading=heading: plots.similarity_maps(part, out, heading))
    title = title or (f"{suite['name']} v{suite['version']}" if suite else f"Leaderboard: {store_dir}")
    return html_page(table, title, provenance, images, metric, tuning if suite else []), len(table)

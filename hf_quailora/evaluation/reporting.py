"""Per-rank results: a tidy table, JSON, Markdown, and a plot of each metric against rank.

A result row is `{"model": label, "rank": b or None, "task": ..., "metric": ..., "value": ..., "stderr": ...}`;
rows with `rank=None` are baselines (the base model without adapter, a fixed-rank LoRA, ...), drawn as
horizontal lines.

Example:

```python
paths = write_rank_report(rows, "outputs/rank_sweep")
print(open(paths["markdown"]).read())
```
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from .._io_utils import check_not_a_file, write_file_atomically


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def rows_to_markdown(rows: list[dict]) -> str:
    """One Markdown table per task: a row per model/rank, a column per metric (`value ± stderr`)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    out = []
    for task, task_rows in by_task.items():
        metrics = sorted({row["metric"] for row in task_rows})
        entries: dict[tuple, dict] = {}
        for row in task_rows:
            entries.setdefault((row["model"], row["rank"]), {})[row["metric"]] = row
        out.append(f"**{task}**\n")
        out.append("| model | rank | " + " | ".join(metrics) + " |")
        out.append("|---|---:|" + "---:|" * len(metrics))
        ordered = sorted(entries, key=lambda key: (key[1] is not None, key[1] or 0, key[0]))
        for model, rank in ordered:
            cells = []
            for metric in metrics:
                row = entries[(model, rank)].get(metric)
                if row is None:
                    cells.append("–")
                elif row.get("stderr") not in (None, "N/A") and not math.isnan(float(row["stderr"])):
                    cells.append(f"{_fmt(row['value'])} ± {_fmt(float(row['stderr']))}")
                else:
                    cells.append(_fmt(row["value"]))
            out.append(f"| {model} | {_fmt(rank) if rank is not None else 'baseline'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_rank_curves(rows: list[dict], path: str, title: str | None = None) -> str:
    """A PNG with one panel per (task, metric): value against rank (log-scale x), baselines as dashed lines."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure registry stay untouched

    panels = sorted({(row["task"], row["metric"]) for row in rows})
    if not panels:
        raise ValueError("No results to plot.")
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for axis, (task, metric) in zip(axes.flat, panels):
        series: dict[str, list[tuple[int, float, float | None]]] = defaultdict(list)
        for row in rows:
            if (row["task"], row["metric"]) != (task, metric):
                continue
            stderr = row.get("stderr")
            stderr = float(stderr) if stderr not in (None, "N/A") else None
            if row["rank"] is None:
                axis.axhline(row["value"], linestyle="--", linewidth=1, label=row["model"], color=f"C{len(series) + 3}")
            else:
                series[row["model"]].append((row["rank"], row["value"], stderr))
        for index, (model, points) in enumerate(sorted(series.items())):
            points.sort()
            ranks, values, errors = zip(*points)
            has_err = all(e is not None and not math.isnan(e) for e in errors)
            axis.errorbar(ranks, values, yerr=errors if has_err else None, marker="o", label=model, color=f"C{index}")
        axis.set_xscale("log", base=2)
        all_ranks = sorted({r for points in series.values() for r, _, _ in points})
        if all_ranks:
            axis.set_xticks(all_ranks, [str(r) for r in all_ranks])
        axis.set_xlabel("LoRA rank")
        axis.set_ylabel(metric)
        axis.set_title(task, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_rank_report(rows: list[dict], output_dir: str, title: str | None = None) -> dict[str, str]:
    """Write `results.json`, `results.md` and `results.png` into `output_dir`; return their paths.

    Each file is written to a temporary file and renamed into place, so an interrupted write never leaves a
    truncated result file; other files in `output_dir` are left alone.
    """
    check_not_a_file(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "markdown": os.path.join(output_dir, "results.md"),
        "plot": os.path.join(output_dir, "results.png"),
    }
    markdown = rows_to_markdown(rows)
    write_file_atomically(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    write_file_atomically(paths["markdown"], lambda tmp: Path(tmp).write_text(markdown))
    write_file_atomically(paths["plot"], lambda tmp: plot_rank_curves(rows, tmp, title))
    return paths

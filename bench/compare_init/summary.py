"""The summary across runs: per model and rank, mean ± standard deviation over seeds of every arm's metrics and of
the gap closed at the start and after fine-tuning, and the convergence curves with seed bands."""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

from .._common import gap_closed, write_file
from .arms import arm_label, arm_order


METRICS = ("perplexity_start", "perplexity_end", "eval_loss_start", "eval_loss_end", "cloze_start", "cloze_end")
GAPS = ("gap_start", "gap_end", "loss_gap_start", "loss_gap_end", "alpaca_ppl_gap_start", "alpaca_ppl_gap_end",
        "cloze_gap_start", "cloze_gap_end")


def mean_std(values: list[float]) -> dict:
    """`{"mean", "std", "n"}` of the non-None `values`; `std` is the sample standard deviation (n − 1), None for
    fewer than two values; `mean` is None for none."""
    values = [value for value in values if value is not None]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(value)


def _gaps(result: dict, qlora: dict | None, int8: dict | None) -> dict:
    """One seed's gap closed at the start and the end, against that seed's arms: in held-out perplexity (`gap`), in
    the Alpaca response loss (`loss_gap`) and in the Alpaca validation perplexity, exp(loss) (`alpaca_ppl_gap`).

    The last is the paper's metric: the validation perplexity of the fine-tuning data. exp is convex, so it is
    never below the loss gap for an arm that lies between QLoRA and int8. `cloze_gap` is the accuracy gap closed
    on `quailora_wiki_cloze` (`--cloze_examples`; None where an arm was not scored)."""
    out = {}
    for when in ("start", "end"):
        for prefix, key, transform in (("gap", "perplexity", None), ("loss_gap", "eval_loss", None),
                                       ("alpaca_ppl_gap", "eval_loss", _exp), ("cloze_gap", "cloze", None)):
            values = [arm and arm.get(f"{key}_{when}") for arm in (qlora, result, int8)]
            if transform is not None:
                values = [transform(value) for value in values]
            out[f"{prefix}_{when}"] = gap_closed(*values)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Group finished arms by (model, rank); per arm, mean ± std over seeds of `METRICS` and `GAPS`.

    The gap closed is computed per seed, against the `qlora` and `int8` arms of the same model, rank and seed, and
    then averaged. Returns one entry per (model, rank): `{"model", "rank", "seeds", "arms": {arm: {...}}}`.
    """
    groups: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        groups[(record["model"], record["rank"])][record["seed"]][record["arm"]] = record["result"]
    summary = []
    for (model, rank), by_seed in groups.items():
        per_arm: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for seed, arms in sorted(by_seed.items()):
            for arm, result in arms.items():
                row = {**{key: result.get(key) for key in METRICS}, **_gaps(result, arms.get("qlora"), arms.get("int8"))}
                row.update(seconds=result["seconds"], seed=seed)
                for key, value in row.items():
                    per_arm[arm][key].append(value)
        ordered = sorted(per_arm, key=arm_order)
        summary.append({
            "model": model, "rank": rank, "seeds": sorted(by_seed),
            "arms": {arm: {**{key: mean_std(per_arm[arm][key]) for key in METRICS + GAPS},
                           "seeds": per_arm[arm]["seed"], "seconds": sum(per_arm[arm]["seconds"])}
                     for arm in ordered},
        })
    return sorted(summary, key=lambda entry: (entry["model"], entry["rank"]))


def _cell(stat: dict, pattern: str) -> str:
    if stat["mean"] is None:
        return "–"
    spread = "" if stat["std"] is None else " ± " + pattern.format(stat["std"])
    return pattern.format(stat["mean"]) + spread


def summary_markdown(summary: list[dict], records: list[dict], meta: dict) -> str:
    """One table per model and rank (mean ± std over seeds), and the QuAILoRA gap closed against the rank."""
    lines = [
        f"{meta['steps']} steps × batch {meta['batch_size']}, lr {meta['learning_rate']} "
        f"({meta['lr_scheduler_type']}), max_length {meta['max_length']}, LoRA alpha = r on "
        f"{meta['target_modules']}, adapters in {meta['adapter_dtype']}. Perplexity: "
        f"{meta['eval_windows']}×{meta['window_length']} held-out "
        f"{meta['perplexity_data']} tokens; Alpaca loss: responses of the last {meta['eval_examples']} examples "
        f"(the last {meta['holdout_examples']} are held out"
        + (f"; the curve's periodic evaluations score the last {meta['curve_eval_examples']}"
           if meta.get("curve_eval_examples") else "") + ")"
        + (f"; QuAILoRA calibrated on {meta['calibration_windows']}×{meta['window_length']} tokens of "
           f"{meta['calibration_data']}" if meta.get("calibration_data") else "")
        + ". Mean ± sample standard deviation over seeds; the gap "
        "closed is computed per seed against that seed's `qlora` and `int8` arms: (qlora − arm) / (qlora − int8); "
        "\"Alpaca ppl gap\" is that of the Alpaca validation perplexity exp(loss), the paper's metric.",
    ]
    for entry in summary:
        seconds = sum(arm["seconds"] for arm in entry["arms"].values())
        lines += [
            "", f"### {entry['model']}, r = {entry['rank']} (seeds {', '.join(map(str, entry['seeds']))}; "
            f"{seconds / 60:.1f} min of arm wall time)", "",
            "| arm | seeds | ppl start | ppl end | Alpaca loss start | Alpaca loss end | gap closed start | "
            "gap closed end | loss gap closed end | Alpaca ppl gap closed end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for arm, stats in entry["arms"].items():
            lines.append(
                f"| {arm_label(arm)} | {len(stats['seeds'])} | {_cell(stats['perplexity_start'], '{:.3f}')} | "
                f"{_cell(stats['perplexity_end'], '{:.3f}')} | {_cell(stats['eval_loss_start'], '{:.4f}')} | "
                f"{_cell(stats['eval_loss_end'], '{:.4f}')} | {_cell(stats['gap_start'], '{:.1%}')} | "
                f"{_cell(stats['gap_end'], '{:.1%}')} | {_cell(stats['loss_gap_end'], '{:.1%}')} | "
                f"{_cell(stats['alpaca_ppl_gap_end'], '{:.1%}')} |"
            )
    lines += _cloze(summary) + _rank_trend(summary) + _convergence(summary, records) + _dynamic_ranks(records)
    return "\n".join(lines) + "\n"


def _cloze(summary: list[dict]) -> list[str]:
    """The `quailora_wiki_cloze` accuracy per arm at the start and the end, and the accuracy gap closed
    ((acc_qlora − acc_arm) / (acc_qlora − acc_int8), per seed); no lines where no arm was scored."""
    entries = [entry for entry in summary if any(stats["cloze_end"]["n"] for stats in entry["arms"].values())]
    if not entries:
        return []
    lines = ["", "Accuracy: `quailora_wiki_cloze` (a Wikipedia sentence's last word among 4, chance 25%; "
             "`--cloze_examples` documents), mean ± std over seeds, and the accuracy gap closed per seed against "
             "that seed's `qlora` and `int8` arms:", "",
             "| model | rank | arm | seeds | accuracy start | accuracy end | accuracy gap closed start | "
             "accuracy gap closed end |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for entry in entries:
        for arm, stats in entry["arms"].items():
            lines.append(f"| {entry['model']} | {entry['rank']} | {arm_label(arm)} | {stats['cloze_end']['n']} | "
                         + " | ".join(_cell(stats[key], "{:.1%}") for key in
                                      ("cloze_start", "cloze_end", "cloze_gap_start", "cloze_gap_end")) + " |")
    return lines


def last_interval_share(values: list[float]) -> float | None:
    """How much of a curve's total change came in its last interval, `(v[-2] − v[-1]) / (v[0] − v[-1])`: near 0 when
    the curve has flattened, near 1 / intervals when it still falls at a constant rate; None when undefined."""
    if len(values) < 3 or values[0] == values[-1]:
        return None
    return (values[-2] - values[-1]) / (values[0] - values[-1])


def _convergence(summary: list[dict], records: list[dict]) -> list[str]:
    """The mean curves over seeds (held-out perplexity and the curve's Alpaca loss at every evaluated step), and the
    share of the total change that came in the last interval: has the curve flattened?"""
    lines = ["", "Convergence: mean over seeds at every evaluated step (perplexity / the curve's Alpaca loss); "
             "\"last interval\" is the share of the start-to-end change that came in the last interval (0% = flat); "
             "\"gap closed\" rows: each arm's gap closed at that step, from the mean curves:"]
    for entry in summary:
        steps = curve_bands(records, entry["model"], entry["rank"], next(iter(entry["arms"])), "eval_loss")[0]
        if len(steps) < 2:
            continue
        lines += ["", f"{entry['model']}, r = {entry['rank']}:", "",
                  "| arm | " + " | ".join(f"step {step}" for step in steps) + " | last interval (ppl / loss) |",
                  "|---|" + "---:|" * (len(steps) + 1)]
        curves = {}
        for arm in entry["arms"]:
            (_, ppl, _), (_, loss, _) = (curve_bands(records, entry["model"], entry["rank"], arm, key)
                                         for key in ("perplexity", "eval_loss"))
            if len(ppl) != len(steps) or len(loss) != len(steps):
                continue
            curves[arm] = ppl, loss
            shares = [last_interval_share(curve) for curve in (ppl, loss)]
            lines.append(f"| {arm_label(arm)} | " + " | ".join(f"{p:.2f} / {l:.3f}" for p, l in zip(ppl, loss))
                         + " | " + " / ".join("–" if s is None else f"{s:.0%}" for s in shares) + " |")
        lines += _gap_rows(curves)
    return lines


def _gap_rows(curves: dict[str, tuple[list, list]]) -> list[str]:
    """Rows of the convergence table: every other arm's gap closed at each step, from the mean curves of `qlora`,
    the arm and `int8` (perplexity / the curve's Alpaca loss): does fine-tuning narrow the start's lead?"""
    if "qlora" not in curves or "int8" not in curves:
        return []
    rows = []
    for arm, (ppl, loss) in curves.items():
        if arm in ("qlora", "int8"):
            continue
        cells = []
        for index in range(len(ppl)):
            gaps = [gap_closed(curves["qlora"][which][index], values[index], curves["int8"][which][index])
                    for which, values in enumerate((ppl, loss))]
            cells.append(" / ".join("–" if gap is None else f"{gap:.1%}" for gap in gaps))
        rows.append(f"| gap closed: {arm_label(arm)} | " + " | ".join(cells) + " | – |")
    return rows


def _rank_trend(summary: list[dict]) -> list[str]:
    """QuAILoRA's gap closed (start and end) at every rank, per model: does it grow with the rank?"""
    rows = [entry for entry in summary if "quailora" in entry["arms"]]
    if not rows:
        return []
    lines = ["", "QuAILoRA's gap closed against the rank (mean ± std of the per-seed gaps; and the gap between the "
             "arms' mean perplexities, less sensitive to a seed whose NF4 → int8 gap is small):", "",
             "| model | rank | gap closed start | gap closed end | gap of the mean ppl, end | "
             "Alpaca ppl gap closed start | Alpaca ppl gap closed end |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for entry in rows:
        arms = entry["arms"]
        stats = arms["quailora"]
        means = [arms[arm]["perplexity_end"]["mean"] if arm in arms else None
                 for arm in ("qlora", "quailora", "int8")]
        lines.append(f"| {entry['model']} | {entry['rank']} | {_cell(stats['gap_start'], '{:.1%}')} | "
                     f"{_cell(stats['gap_end'], '{:.1%}')} | {_cell(mean_std([gap_closed(*means)]), '{:.1%}')} | "
                     f"{_cell(stats['alpaca_ppl_gap_start'], '{:.1%}')} | "
                     f"{_cell(stats['alpaca_ppl_gap_end'], '{:.1%}')} |")
    return lines


def _dynamic_ranks(records: list[dict]) -> list[str]:
    """The dynamic arm per truncated rank: held-out perplexity at the start and the end, mean ± std over seeds, and
    beside the end the fixed-rank `quailora` and `qlora` arms trained at that rank (same model and seeds), where they
    ran: does one dynamic run give, at rank b, what a separate run at rank b gives?"""
    fixed = {(record["model"], record["rank"], record["seed"], record["arm"]): record["result"]
             for record in records if record["arm"] in ("quailora", "qlora")}
    per: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["arm"] == "dynamic":
            for b in record["result"]["per_rank"]["end"]:
                values = per[(record["model"], record["rank"], int(b))]
                for when in ("start", "end"):
                    values[when].append(record["result"]["per_rank"][when][b]["perplexity"])
                for arm in ("quailora", "qlora"):
                    other = fixed.get((record["model"], int(b), record["seed"], arm))
                    values[arm].append(other and other["perplexity_end"])
    if not per:
        return []
    lines = ["", "Dynamic-rank arm per truncated rank (held-out perplexity, constant scaling), and the fixed-rank "
             "arms trained at that rank with the same seeds (– where none ran):", "",
             "| model | r_max | rank | seeds | ppl start | ppl end | QuAILoRA at this rank, end | "
             "QLoRA at this rank, end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, rank, b), values in sorted(per.items()):
        lines.append(f"| {model} | {rank} | {b} | {len(values['end'])} | {_cell(mean_std(values['start']), '{:.3f}')} "
                     f"| {_cell(mean_std(values['end']), '{:.3f}')} | {_seeds_cell(values['quailora'])} "
                     f"| {_seeds_cell(values['qlora'])} |")
    return lines


def _seeds_cell(values: list) -> str:
    """mean ± std of a fixed-rank arm over the dynamic arm's seeds; `(n of k seeds)` when only some of them ran it."""
    stat = mean_std(values)
    missing = len(values) - stat["n"]
    return _cell(stat, "{:.3f}") + (f" ({stat['n']} of {len(values)} seeds)" if missing and stat["n"] else "")


def curve_bands(records: list[dict], model: str, rank: int, arm: str, key: str) -> tuple[list, list, list]:
    """`(steps, mean, std)` of `key` over the seeds of one arm, at the steps every seed evaluated."""
    histories = []
    for record in records:
        if (record["model"], record["rank"], record["arm"]) == (model, rank, arm):
            history = record["result"]["history"]
            # the curve's Alpaca loss: the periodic subset only (the start and end are also scored on all examples)
            curve = min((entry.get("alpaca_examples") or 0 for entry in history), default=0)
            histories.append({entry["step"]: entry[key] for entry in history
                              if key != "eval_loss" or (entry.get("alpaca_examples") or 0) == curve})
    steps = sorted(set.intersection(*(set(history) for history in histories))) if histories else []
    stats = [mean_std([history[step] for history in histories]) for step in steps]
    return steps, [stat["mean"] for stat in stats], [stat["std"] or 0.0 for stat in stats]


def gap_bands(records: list[dict], model: str, rank: int, arm: str) -> tuple[list, list, list]:
    """`(steps, mean, std)` of `arm`'s held-out perplexity gap closed over the seeds, computed per seed and step
    against that seed's `qlora` and `int8` arms, at the steps all three evaluated; empty for seeds lacking one."""
    by_seed: dict[int, dict[str, dict]] = defaultdict(dict)
    for record in records:
        if (record["model"], record["rank"]) == (model, rank) and record["arm"] in ("qlora", "int8", arm):
            by_seed[record["seed"]][record["arm"]] = {entry["step"]: entry["perplexity"]
                                                      for entry in record["result"]["history"]}
    curves = []
    for arms in by_seed.values():
        if {"qlora", "int8", arm} <= set(arms):
            steps = sorted(set(arms["qlora"]) & set(arms["int8"]) & set(arms[arm]))
            curves.append({step: gap_closed(arms["qlora"][step], arms[arm][step], arms["int8"][step])
                           for step in steps})
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    stats = [mean_std([curve[step] for curve in curves]) for step in steps]
    keep = [index for index, stat in enumerate(stats) if stat["mean"] is not None]
    return ([steps[i] for i in keep], [stats[i]["mean"] for i in keep], [stats[i]["std"] or 0.0 for i in keep])


def _seeds(count: int) -> str:
    return f"{count} seed" + ("" if count == 1 else "s")


def plot_summary(records: list[dict], summary: list[dict], path: str) -> str:
    """A PNG, one row per (model, rank): held-out perplexity and Alpaca loss against the step, per arm the mean over
    seeds with a ± one standard deviation band; when the `qlora` and `int8` arms ran, a third panel with every other
    arm's perplexity gap closed against the step (per seed, then mean ± std) and the paper's 75% as a line."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure registry stay untouched

    with_gaps = any({"qlora", "int8"} <= set(entry["arms"]) for entry in summary)
    columns = 3 if with_gaps else 2
    figure = Figure(figsize=(5.5 * columns, 3.6 * len(summary)))
    axes = figure.subplots(len(summary), columns, squeeze=False)
    for row, entry in zip(axes, summary):
        if with_gaps:
            _plot_gaps(row[2], records, entry)
        for index, arm in enumerate(entry["arms"]):
            for axis, key in zip(row, ("perplexity", "eval_loss")):
                _band(axis, *curve_bands(records, entry["model"], entry["rank"], arm, key), index,
                      f"{arm} ({_seeds(len(entry['arms'][arm]['seeds']))})")
        for axis, label in zip(row, ("held-out perplexity", "held-out Alpaca response loss",
                                     "NF4 → int8 perplexity gap closed (%)")):
            axis.set_title(f"{os.path.basename(entry['model'].rstrip('/'))}, r = {entry['rank']}", fontsize=9)
            axis.set_xlabel("optimizer step")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    return write_file(path, lambda temporary: figure.savefig(temporary, dpi=110))


def _band(axis, steps: list, mean: list, std: list, index: int, label: str, scale: float = 1.0) -> None:
    """One arm's mean curve with its ± one standard deviation band, in colour `index`."""
    axis.plot(steps, [scale * m for m in mean], marker="o", markersize=3, color=f"C{index}", label=label)
    axis.fill_between(steps, [scale * (m - s) for m, s in zip(mean, std)],
                      [scale * (m + s) for m, s in zip(mean, std)], color=f"C{index}", alpha=0.2, linewidth=0)


def _plot_gaps(axis, records: list[dict], entry: dict) -> None:
    """The third panel of `plot_summary`: each arm's held-out perplexity gap closed (%) against the step."""
    for index, arm in enumerate(entry["arms"]):
        bands = gap_bands(records, entry["model"], entry["rank"], arm) if arm not in ("qlora", "int8") else ([],)
        if bands[0]:
            _band(axis, *bands, index, arm, scale=100.0)
    axis.axhline(75, color="grey", linestyle="--", linewidth=1, label="paper's average (75%)")

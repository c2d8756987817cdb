"""Why the gap closed moves during fine-tuning: the distance of each arm to int8, and the points lost split into
QLoRA catching up and the arm's own drift.

Write an arm's distance to int8 as d = log(ppl_arm / ppl_int8) (for the Alpaca loss, d = loss_arm − loss_int8, the
log of the Alpaca validation perplexity ratio). With d_N the `qlora` arm's distance and d_Q another arm's, the gap
closed is about G = 1 − d_Q / d_N. Between the start (s) and the end (e) of fine-tuning,

    G_s − G_e = (d_Q,s / d_N,e − d_Q,s / d_N,s)   # QLoRA catching up: its own adapter repairs quantization error
              + (d_Q,e − d_Q,s) / d_N,e           # the arm's own drift away from int8

and the two terms sum exactly to the points lost. Both are computed per seed against that seed's `qlora` and
`int8` arms, then averaged over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .summary import mean_std


METRICS = {"perplexity": "held-out perplexity", "eval_loss": "Alpaca validation perplexity"}


def distance(arm: dict, int8: dict, metric: str, when: str) -> float | None:
    """An arm's distance to int8 on `metric` ("perplexity" or "eval_loss") at `when` ("start" or "end"): the log of
    the perplexity ratio; None when either value is missing or not positive."""
    value, reference = arm.get(f"{metric}_{when}"), int8.get(f"{metric}_{when}")
    if value is None or reference is None:
        return None
    if metric == "eval_loss":
        return value - reference
    return math.log(value / reference) if value > 0 and reference > 0 else None


def split_points_lost(d_n: tuple[float, float], d_q: tuple[float, float]) -> dict | None:
    """`{"caught_up", "drift", "lost"}` in points of gap closed (fractions, 0.01 = one point) from the (start, end)
    distances of QLoRA (`d_n`) and the arm (`d_q`); None where a QLoRA distance is zero or missing."""
    (n_start, n_end), (q_start, q_end) = d_n, d_q
    if None in (n_start, n_end, q_start, q_end) or n_start == 0 or n_end == 0:
        return None
    caught_up = q_start / n_end - q_start / n_start
    drift = (q_end - q_start) / n_end
    return {"caught_up": caught_up, "drift": drift, "lost": caught_up + drift}


def decompose(records: list[dict]) -> list[dict]:
    """Per (model, rank, arm other than qlora/int8, metric): mean ± std over seeds of d_N and d_Q at the start and
    end, and of the points lost to QLoRA catching up and to the arm's drift.

    Returns a list of `{"model", "rank", "arm", "metric", "seeds", "d_n_start", "d_n_end", "d_q_start", "d_q_end",
    "caught_up", "drift", "lost"}`, each statistic as `mean_std` gives it.
    """
    groups: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        groups[(record["model"], record["rank"])][record["seed"]][record["arm"]] = record["result"]
    rows = []
    for (model, rank), by_seed in sorted(groups.items()):
        arms = sorted({arm for seeds in by_seed.values() for arm in seeds} - {"qlora", "int8"})
        for arm in arms:
            for metric in METRICS:
                values: dict[str, list] = defaultdict(list)
                for seed, seed_arms in sorted(by_seed.items()):
                    if not {"qlora", "int8", arm} <= set(seed_arms):
                        continue
                    d_n = tuple(distance(seed_arms["qlora"], seed_arms["int8"], metric, w) for w in ("start", "end"))
                    d_q = tuple(distance(seed_arms[arm], seed_arms["int8"], metric, w) for w in ("start", "end"))
                    values["seeds"].append(seed)
                    for key, value in zip(("d_n_start", "d_n_end", "d_q_start", "d_q_end"), d_n + d_q):
                        values[key].append(value)
                    split = split_points_lost(d_n, d_q) or {}
                    for key in ("caught_up", "drift", "lost"):
                        values[key].append(split.get(key))
                if values["seeds"]:
                    rows.append({"model": model, "rank": rank, "arm": arm, "metric": metric, "seeds": values["seeds"],
                                 **{key: mean_std(values[key]) for key in values if key != "seeds"}})
    return rows


def _cell(stat: dict, pattern: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "–"
    spread = "" if stat["std"] is None else " ± " + pattern.format(scale * stat["std"])
    return pattern.format(scale * stat["mean"]) + spread


def decomposition_markdown(rows: list[dict]) -> list[str]:
    """The decomposition table (lines of markdown; none without a `qlora` and `int8` arm)."""
    if not rows:
        return []
    lines = ["", "Distance to int8, d = log(ppl_arm / ppl_int8), of QLoRA (d_N) and of each other arm (d_Q), at the "
             "start and the end; and the points of gap closed lost during fine-tuning, split into QLoRA catching up "
             "(d_Q,s / d_N,e − d_Q,s / d_N,s) and the arm's own drift ((d_Q,e − d_Q,s) / d_N,e). Mean ± std over "
             "seeds, each seed against its own `qlora` and `int8` arms:", "",
             "| model | rank | arm | metric | seeds | d_N start | d_N end | d_Q start | d_Q end | points lost | "
             "to QLoRA catching up | to the arm's drift |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['rank']} | {row['arm']} | {METRICS[row['metric']]} | {len(row['seeds'])} | "
            + " | ".join(_cell(row[key], "{:.4f}") for key in ("d_n_start", "d_n_end", "d_q_start", "d_q_end"))
            + " | " + " | ".join(_cell(row[key], "{:.1f}", 100.0) for key in ("lost", "caught_up", "drift")) + " |")
    return lines

"""The report of the fine-tuning comparison: the markdown table, the gap closed and the convergence plot."""

from __future__ import annotations


def gap_closed(qlora: float | None, value: float | None, int8: float | None) -> float | None:
    """The fraction of the NF4 → int8 perplexity gap closed, `(qlora − value) / (qlora − int8)`; None if undefined."""
    if None in (qlora, value, int8) or qlora == int8:
        return None
    return (qlora - value) / (qlora - int8)


def format_cell(value, pattern="{:.3f}") -> str:
    """`value` formatted by `pattern`, or "–" for None."""
    return "–" if value is None else pattern.format(value)


def _arm_row(result: dict, qlora: dict | None, int8: dict | None) -> str:
    gaps = [
        gap_closed(
            qlora and qlora[f"perplexity_{when}"], result[f"perplexity_{when}"],
            int8 and int8[f"perplexity_{when}"],
        )
        for when in ("start", "end")
    ]
    return (
        f"| {result['label']} | {result['perplexity_start']:.3f} | {result['perplexity_end']:.3f} | "
        f"{result['eval_loss_start']:.4f} | {result['eval_loss_end']:.4f} | {format_cell(gaps[0], '{:.1%}')} | "
        f"{format_cell(gaps[1], '{:.1%}')} | {format_cell(result['init_seconds'], '{:.1f}')} | "
        f"{result['train_seconds']:.1f} |"
    )


def to_markdown(results: list[dict], meta: dict) -> str:
    """The results table of every arm (and the per-rank table of the dynamic arm), with the settings above it."""
    by_arm = {result["arm"]: result for result in results}
    qlora, int8 = by_arm.get("qlora"), by_arm.get("int8")
    lines = [
        f"Model {meta['model']}, LoRA r={meta['rank']} (alpha = r, {meta['target_modules']}), "
        f"{meta['steps']} steps × batch {meta['batch_size']}, lr {meta['learning_rate']} "
        f"({meta['lr_scheduler_type']}), max_length {meta['max_length']}, seed {meta['seed']}, adapters in "
        f"{meta['adapter_dtype']}. Perplexity: "
        f"{meta['eval_windows']}×{meta['window_length']} held-out {meta['perplexity_data']} tokens; Alpaca loss: "
        f"responses of the last {meta['eval_examples']} examples (the last {meta['holdout_examples']} are held out); "
        f"training on the first {meta['train_examples']}. torch {meta['torch']}, {meta['threads']} thread(s).",
        "",
        "| arm | ppl start | ppl end | Alpaca loss start | Alpaca loss end | gap closed start | gap closed end "
        "| init (s) | train (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_arm_row(result, qlora, int8) for result in results]
    if "qlora" not in by_arm or "int8" not in by_arm:
        lines += ["", "gap closed needs both the `qlora` and `int8` arms."]
    lines += ["", "gap closed = (ppl_qlora − ppl_arm) / (ppl_qlora − ppl_int8), at the same point (start or end)."]
    if "dynamic" in by_arm:
        per_rank = by_arm["dynamic"]["per_rank"]
        lines += ["", "Dynamic-rank arm, per rank (truncated adapter, constant scaling):", "",
                  "| rank | ppl start | ppl end | Alpaca loss start | Alpaca loss end |", "|---:|---:|---:|---:|---:|"]
        for b in per_rank["start"]:
            s, e = per_rank["start"][b], per_rank["end"][b]
            lines.append(f"| {b} | {s['perplexity']:.3f} | {e['perplexity']:.3f} | {s['eval_loss']:.4f} | "
                         f"{e['eval_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot_per_rank(axis, dynamic: dict, results: list[dict]) -> None:
    """The dynamic arm's panel: perplexity against the truncated rank, at the start and the end."""
    for when, style in (("start", "--"), ("end", "-")):
        ranks = [int(b) for b in dynamic["per_rank"][when]]
        axis.plot(ranks, [dynamic["per_rank"][when][str(b)]["perplexity"] for b in ranks], style, marker="o",
                  label=f"dynamic, {when}")
    for arm, style in (("qlora", ":"), ("int8", "-.")):
        match = next((result for result in results if result["arm"] == arm), None)
        if match:
            label = f"{arm} end (full rank)"
            axis.axhline(match["perplexity_end"], linestyle=style, color="gray", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(ranks, [str(b) for b in ranks])
    axis.set_xlabel("LoRA rank (truncated)")
    axis.set_ylabel("held-out perplexity")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def plot_convergence(results: list[dict], path: str) -> str:
    """A PNG of held-out perplexity and Alpaca loss against the step per arm (and the dynamic arm's ranks)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure registry stay untouched

    dynamic = next((result for result in results if result["arm"] == "dynamic"), None)
    columns = 3 if dynamic else 2
    figure = Figure(figsize=(5.2 * columns, 4))
    axes = figure.subplots(1, columns)
    for index, result in enumerate(results):
        steps = [entry["step"] for entry in result["history"]]
        for axis, key in zip(axes, ("perplexity", "eval_loss")):
            values = [entry[key] for entry in result["history"]]
            axis.plot(steps, values, marker="o", label=result["arm"], color=f"C{index}")
    for axis, label in zip(axes, ("held-out perplexity", "held-out Alpaca response loss")):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if dynamic:
        _plot_per_rank(axes[2], dynamic, results)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path

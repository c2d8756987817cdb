"""QuAILoRA on a real model (SmolLM2-135M-Instruct or Gemma-3-270m): held-out perplexity of every start, gap closed,
and wall times.

    python bench/bench_quailora.py                      # SmolLM2-135M, defaults below, 2 threads, ~10 min on 2 cores
    python bench/bench_quailora.py --model gemma3-270m --batch_size 2    # BOS on every window (Gemma needs it)
    python bench/bench_quailora.py --ranks 8 16 --eval_windows 16 --threads 1

Rows: fp32 (the model), LLM.int8, NF4 with B = 0 (QLoRA's start), and per rank the uncalibrated SVD start
(LoftQ-style, Q fixed), QuAILoRA's closed form and QuAILoRA's ALS. "gap closed" is the fraction of the
NF4 → int8 perplexity gap a start closes: (ppl_NF4 − ppl) / (ppl_NF4 − ppl_int8). Calibration: C4 windows;
held-out: Wikipedia windows (different sources). Gram matrices are collected once and reused for every rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from hf_quailora import (
    QuAILoRAConfig,
    compute_perplexity,
    find_lora_layers,
    load_dataset_any,
    load_quantized_model,
    make_token_windows,
    quailora_init,
)
from hf_quailora.embedded.models import EMBEDDED_MODELS, is_embedded_model
from hf_quailora.quailora.calibration import collect_gram_matrices, make_calibration_batches


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import format_gap, gap_closed, lora_config, peft_model, write_results
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import format_gap, gap_closed, lora_config, peft_model, write_results


LABELS = {"svd": "SVD start (uncalibrated)", "closed_form": "QuAILoRA closed form", "als": "QuAILoRA ALS (20 it.)"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an embedded name (smollm2-135m, gemma3-270m), a "
                        "folder or a Hub id")
    parser.add_argument("--add_bos", action="store_true", help="start every window with BOS (on for gemma3-270m)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per perplexity forward (Gemma's "
                        "262k-token vocabulary: 2 keeps the logits near 0.5 GB)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--als_ranks", type=int, nargs="*", default=[8, 64], help="ranks also solved by ALS")
    parser.add_argument("--calibration_windows", type=int, default=32, help="C4 windows (×window tokens)")
    parser.add_argument("--eval_windows", type=int, default=24, help="held-out Wikipedia windows")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="bench/results")
    parser.add_argument("--streaming_rank", type=int, default=None,
                        help="rank of the streamed / all-at-once / float32 comparison (default: the largest rank)")
    parser.add_argument("--streaming_repeats", type=int, default=2, help="alternating runs of each mode")
    parser.add_argument("--streaming_only", action="store_true",
                        help="only the streaming comparison (writes quailora_streaming[-model].md|json), not the "
                             "start table")
    return parser


class Rows(list):
    """Result rows, printed as they come."""

    def add(self, name, ppl, **extra):
        self.append({"start": name, "perplexity": ppl, **extra})
        print(f"{name:32s} ppl {ppl:8.3f} {extra}", flush=True)


def load_adapters(args, rows: Rows, held_out):
    """The NF4 model with one LoRA adapter per rank (all-linear, alpha = r); adds the B = 0 row."""
    model = peft_model(args.model, "nf4", rank=args.ranks[0], adapter_name=f"r{args.ranks[0]}")
    for rank in args.ranks[1:]:
        model.add_adapter(f"r{rank}", lora_config(rank))
    with model.disable_adapter():
        rows.add("NF4 (B = 0, QLoRA start)", compute_perplexity(model, held_out, args.batch_size))
    return model


def solve_every_rank(args, model, stats, rows: Rows, held_out) -> dict:
    """Every solver at every rank from the same Gram matrices; returns the ALS / closed-form error ratios."""
    als_check = {}
    for rank in args.ranks:
        adapter = f"r{rank}"
        model.set_adapter(adapter)
        reports = {}
        for solver in ["svd", "closed_form"] + (["als"] if rank in args.als_ranks else []):
            config = QuAILoRAConfig(solver=solver, show_progress=False)
            reports[solver] = quailora_init(model, stats if solver != "svd" else None, config, adapter_name=adapter)
            rows.add(f"r={rank} {LABELS[solver]}", compute_perplexity(model, held_out, args.batch_size), rank=rank,
                     solver=solver, solve_seconds=reports[solver].solve_seconds)
        if "als" in reports:
            ratios = [a.calibrated_error_result / c.calibrated_error_result
                      for a, c in zip(reports["als"].layers, reports["closed_form"].layers)]
            als_check[rank] = {"max_ratio": max(ratios), "mean_ratio": sum(ratios) / len(ratios)}
            print(f"r={rank}: ALS / closed-form calibrated error per layer: max {max(ratios):.5f}", flush=True)
    return als_check


STREAMING_CASES = {  # name: QuAILoRAConfig settings; the first is the baseline and the reference factors
    "all at once (streaming='off'), float64 Gram": dict(streaming="off", gram_dtype="float64"),
    "streamed (replay), float64 Gram": dict(streaming="replay", gram_dtype="float64"),
    "streamed (replay), float32 Gram (the default)": dict(streaming="replay", gram_dtype="float32"),
}


def compare_streaming(args, model, calibration, held_out) -> list[dict]:
    """End-to-end `quailora_init` (calibration + solve) per streaming mode at one rank, alternating the modes
    `--streaming_repeats` times in this process: wall time, held-out perplexity, and the factors' largest
    difference from the all-at-once factors."""
    rank = args.streaming_rank or max(args.ranks)
    adapter = f"r{rank}"
    model.set_adapter(adapter)
    layers = find_lora_layers(model, adapter)
    results = {name: {"case": name, "rank": rank, "seconds": []} for name in STREAMING_CASES}
    reference = None
    for repeat in range(args.streaming_repeats):
        for name, settings in STREAMING_CASES.items():
            config = QuAILoRAConfig(solver="closed_form", calibration_samples=None, calibration_batch_size=8,
                                    show_progress=False, **settings)
            started = time.perf_counter()
            quailora_init(model, calibration, config, adapter_name=adapter)
            results[name]["seconds"].append(time.perf_counter() - started)
            factors = {key: (layer.lora_B[adapter].weight.detach().clone(),
                             layer.lora_A[adapter].weight.detach().clone()) for key, layer in layers.items()}
            reference = reference or factors
            results[name]["max_factor_difference"] = max(
                float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                for key in factors for mine, ref in zip(factors[key], reference[key]))
            # The product BA is what the model uses; a component's sign (B[:, i], A[i] both negated) is arbitrary.
            results[name]["max_product_difference"] = max(
                float((B @ A - B_ref @ A_ref).abs().max() / (B_ref @ A_ref).abs().max().clamp_min(1e-30))
                for (B, A), (B_ref, A_ref) in ((factors[key], reference[key]) for key in factors))
            if repeat == 0:
                results[name]["perplexity"] = compute_perplexity(model, held_out, args.batch_size)
            print(f"{name}: {results[name]['seconds'][-1]:.1f} s {results[name]}", flush=True)
    return list(results.values())


def streaming_markdown(results: list[dict], threads: int) -> list[str]:
    baseline = sum(results[0]["seconds"]) / len(results[0]["seconds"])
    lines = [
        "",
        f"End-to-end `quailora_init` (calibration + closed-form solves) at r={results[0]['rank']}, modes alternated "
        f"in one process, {threads} threads:",
        "",
        "| init | held-out ppl | product BA: max relative difference from the first row | factors B, A: the same "
        "(a component's sign is arbitrary) | wall time (s), each run | mean time / first row |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in results:
        mean = sum(row["seconds"]) / len(row["seconds"])
        lines.append(
            f"| {row['case']} | {row['perplexity']:.4f} | {row['max_product_difference']:.1e} | "
            f"{row['max_factor_difference']:.1e} | "
            f"{', '.join(f'{s:.1f}' for s in row['seconds'])} | {mean / baseline:.2f} |"
        )
    return lines


def to_markdown(args, rows: Rows, stats, held_out, calibration_seconds: float, als_check: dict) -> str:
    by_name = {row["start"]: row["perplexity"] for row in rows}
    nf4, int8 = by_name["NF4 (B = 0, QLoRA start)"], by_name["LLM.int8 (B = 0)"]
    lines = [
        f"Model {args.model}; calibration {stats.num_tokens} C4 tokens; held-out {held_out.numel()} Wikipedia tokens"
        f"{' (BOS first in every window)' if args.add_bos else ''}; "
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}.",
        "",
        "| start | held-out ppl | gap NF4→int8 closed | solve time (s) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        row["gap_closed"] = gap_closed(nf4, row["perplexity"], int8)
        solve = f"{row['solve_seconds']:.1f}" if "solve_seconds" in row else ""
        lines.append(f"| {row['start']} | {row['perplexity']:.3f} | {format_gap(row['gap_closed'])} | {solve} |")
    lines += ["", f"Calibration forward passes with Gram accumulation: {calibration_seconds:.1f} s."]
    for rank, check in als_check.items():
        lines.append(
            f"r={rank}: ALS calibrated error / closed form, per layer: max {check['max_ratio']:.5f}, "
            f"mean {check['mean_ratio']:.5f}."
        )
    return "\n".join(lines)


def results_stem(args) -> str:
    """`quailora` for the default model, `quailora-<model>` for the others."""
    return "quailora" if args.model == "smollm2-135m" else f"quailora-{os.path.basename(args.model.rstrip('/'))}"


def streaming_only(args, tokenizer, held_out, calibration) -> None:
    """`--streaming_only`: the NF4 model with one adapter at the comparison's rank, and the comparison alone."""
    rank = args.streaming_rank or max(args.ranks)
    args.ranks = [rank]
    model = load_adapters(args, Rows(), held_out)
    streaming = compare_streaming(args, model, calibration, held_out)
    table = "\n".join(streaming_markdown(streaming, args.threads)).strip()
    print("\n" + table)
    stem = os.path.join(args.output, results_stem(args).replace("quailora", "quailora_streaming", 1))
    write_results(stem, table + "\n", {"args": vars(args), "streaming": streaming})


def main() -> None:
    args = make_parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = Rows()
    # 1. Held-out and calibration windows; the fp32 and int8 baselines.
    _, tokenizer = load_quantized_model(args.model, "none")
    if is_embedded_model(args.model) and EMBEDDED_MODELS[args.model.lower()].needs_bos:
        args.add_bos = True
    held_out = make_token_windows(tokenizer, load_dataset_any("wiki")["text"], args.window, args.eval_windows,
                                  add_bos=args.add_bos)
    calibration = make_token_windows(tokenizer, load_dataset_any("c4")["text"], args.window, args.calibration_windows,
                                     add_bos=args.add_bos)
    if args.streaming_only:
        return streaming_only(args, tokenizer, held_out, calibration)
    for quantization, name in (("none", "fp32"), ("int8", "LLM.int8 (B = 0)")):
        model, _ = load_quantized_model(args.model, quantization)
        rows.add(name, compute_perplexity(model, held_out, args.batch_size))
        del model
    model = load_adapters(args, rows, held_out)
    # 2. Calibration once: the quantized model with adapters off sees the same inputs whatever the rank.
    started = time.perf_counter()
    batches = make_calibration_batches(calibration, num_samples=None, batch_size=8)
    model.eval()
    with model.disable_adapter():
        stats = collect_gram_matrices(model, batches, find_lora_layers(model, f"r{args.ranks[0]}"))
    calibration_seconds = time.perf_counter() - started
    print(f"calibration: {stats.num_tokens} tokens in {calibration_seconds:.1f} s", flush=True)
    # 3. Every solver at every rank, then the table.
    als_check = solve_every_rank(args, model, stats, rows, held_out)
    table = to_markdown(args, rows, stats, held_out, calibration_seconds, als_check)
    del stats
    # 4. Streamed against all at once, end to end, in this run.
    streaming = compare_streaming(args, model, calibration, held_out) if args.streaming_repeats else []
    if streaming:
        table += "\n" + "\n".join(streaming_markdown(streaming, args.threads))
    print("\n" + table)
    write_results(os.path.join(args.output, results_stem(args)), table + "\n",
                  {"args": vars(args), "rows": rows, "calibration_seconds": calibration_seconds,
                   "calibration_tokens": int(calibration.numel()), "als_check": als_check, "streaming": streaming})


if __name__ == "__main__":
    main()

"""How much calibration QuAILoRA needs: the start's held-out gap closed against the number of C4 calibration tokens.

    OMP_WAIT_POLICY=passive python bench/bench_calibration_size.py --threads 1          # SmolLM2-135M, r = 64
    python bench/bench_calibration_size.py --model gemma3-270m --batch_size 2          # BOS on every window
    python bench/bench_calibration_size.py --calibration_data wiki --calibration_tokens 8192,32768  # in-domain

In one process: the LLM.int8 (B = 0) and NF4 (B = 0, QLoRA's start) perplexities, then the NF4 model with one LoRA
(r = `lora_alpha` = `--rank`, all linear layers) initialised by QuAILoRA's closed form once per calibration size
(the first n C4 windows of `--window` tokens, so every smaller set is a prefix of the larger ones; with
`--calibration_data wiki`, the Wikipedia windows after the held-out ones, to separate the domain shift from the
amount). Per size:
held-out Wikipedia perplexity and its gap closed, `(ppl_NF4 − ppl) / (ppl_NF4 − ppl_int8)`; the perplexity on the
first `--fit_windows` calibration windows (part of every calibration set: how well the start fits what it saw);
and the calibrated error relative to B = 0 summed over layers, as `quailora_init` reports it on its own calibration
tokens. Results are written after every size (`calibration_size[-model][-wiki].md|json` in `--output`); a later
run with the same model, rank, windows and calibration data keeps the sizes already measured there and runs only
the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from hf_quailora import (
    QuAILoRAConfig,
    compute_perplexity,
    load_dataset_any,
    load_quantized_model,
    make_token_windows,
    quailora_init,
)
from hf_quailora.embedded.models import EMBEDDED_MODELS, is_embedded_model


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import format_gap, gap_closed, peft_model, write_results
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import format_gap, gap_closed, peft_model, write_results


def make_parser() -> argparse.ArgumentParser:
    """The command-line options (`--help`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, folder or Hub id")
    parser.add_argument("--rank", type=int, default=64, help="LoRA r (lora_alpha = r)")
    parser.add_argument("--calibration_tokens", default="2048,8192,32768,65536,131072",
                        help="comma-separated calibration sizes in tokens (multiples of --window)")
    parser.add_argument("--calibration_data", choices=("c4", "wiki"), default="c4",
                        help="c4: the embedded C4 (another domain than the held-out text); wiki: the embedded "
                             "Wikipedia windows after the held-out ones (in-domain, disjoint from them)")
    parser.add_argument("--window", type=int, default=256, help="tokens per calibration / held-out window")
    parser.add_argument("--eval_windows", type=int, default=24, help="held-out Wikipedia windows")
    parser.add_argument("--fit_windows", type=int, default=8, help="calibration windows scored as 'fit' perplexity")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results")
    return parser


def calibration_and_held_out(tokenizer, name: str, window: int, eval_windows: int, add_bos: bool):
    """`(calibration windows, held-out windows, calibration documents)`. The held-out windows are always the first
    `eval_windows` of the embedded Wikipedia; with `name == "wiki"` the calibration windows are the Wikipedia
    windows after them, so the two never share a token window."""
    wiki = load_dataset_any("wiki")["text"]
    if name == "wiki":
        every = make_token_windows(tokenizer, wiki, window, add_bos=add_bos)
        if every.shape[0] <= eval_windows:
            raise ValueError(f"`--eval_windows` ({eval_windows}) leaves no Wikipedia window for calibration (the text "
                             f"holds {every.shape[0]} windows of {window}); lower it or use --calibration_data c4.")
        return every[eval_windows:], every[:eval_windows], wiki
    if name != "c4":
        raise ValueError(f"`--calibration_data` must be 'c4' or 'wiki', not {name!r}.")
    c4 = load_dataset_any("c4")["text"]
    held_out = make_token_windows(tokenizer, wiki, window, eval_windows, add_bos=add_bos)
    return make_token_windows(tokenizer, c4, window, add_bos=add_bos), held_out, c4


def parse_sizes(text: str, window: int, available: int, data: str = "C4") -> list[int]:
    """`--calibration_tokens` → sorted window counts; raises ValueError on a size that is not a positive multiple of
    `window` or exceeds the `available` windows of the calibration text."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise ValueError(f"`--calibration_tokens` ({text!r}) must be comma-separated integers.") from err
    bad = [size for size in sizes if size < window or size % window]
    if not sizes or bad:
        raise ValueError(f"`--calibration_tokens` ({text!r}): {bad or 'none given'}; give positive multiples of "
                         f"--window ({window}).")
    if sizes[-1] > available * window:
        raise ValueError(f"`--calibration_tokens` asks for {sizes[-1]} tokens; the {data} text holds {available} full "
                         f"windows of {window} = {available * window} tokens. Lower the largest size.")
    return [size // window for size in sizes]


def to_markdown(result: dict) -> str:
    """The settings, the baselines and one row per calibration size."""
    meta, base = result["settings"], result["baselines"]
    nf4, int8 = base["nf4"], base["int8"]
    data = meta.get("calibration_data", "c4")
    source = (f"C4 tokens (the embedded C4 holds {meta['c4_tokens']} tokens in {meta['c4_documents']} documents)"
              if data == "c4" else
              f"Wikipedia tokens after the held-out windows ({meta['calibration_windows_available']} windows; the "
              "held-out windows are never calibrated on)")
    lines = [
        f"Model {meta['model']}, LoRA r={meta['rank']} (alpha = r, all linear layers), QuAILoRA closed form "
        f"(streamed, float32 Gram); calibration: the first n windows of {meta['window']} {source}; held-out: "
        f"{meta['eval_windows']}×{meta['window']} Wikipedia tokens; fit: the first {meta['fit_windows']} calibration "
        f"windows. torch {meta['torch']}, {meta['threads']} thread(s), {meta['platform']}.",
        "",
        f"Baselines: fp32 {base['fp32']:.3f}, LLM.int8 (B = 0) {int8:.3f}, NF4 (B = 0) {nf4:.3f} held-out ppl; "
        f"fit-window ppl NF4 {base['nf4_fit']:.3f}, int8 {base['int8_fit']:.3f}.",
        "",
        "| calibration tokens | held-out ppl | held-out gap closed | fit-window ppl | fit gap closed | "
        "calibrated error / B = 0 | init (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['tokens']} | {row['perplexity']:.3f} | {format_gap(row['gap_closed'])} | "
            f"{row['fit_perplexity']:.3f} | {format_gap(row['fit_gap_closed'])} | "
            f"{row['relative_calibrated_error']:.4f} | {row['init_seconds']:.1f} |"
        )
    lines += ["", "gap closed = (ppl_NF4 − ppl) / (ppl_NF4 − ppl_int8), on the same windows."]
    return "\n".join(lines) + "\n"


SAME_RUN = ("model", "rank", "window", "eval_windows", "fit_windows", "add_bos", "calibration_data")


def load_finished_rows(stem: str, settings: dict) -> list[dict]:
    """The rows of an earlier run at `stem.json` with the same `SAME_RUN` settings (none otherwise)."""
    if not os.path.exists(stem + ".json"):
        return []
    with open(stem + ".json") as handle:
        earlier = json.load(handle)
    earlier["settings"].setdefault("calibration_data", "c4")  # runs from before the option calibrated on C4
    if any(earlier["settings"].get(key) != settings[key] for key in SAME_RUN):
        return []
    return earlier["rows"]


def measure_baselines(args, held_out, fit) -> dict:
    """Held-out perplexity of the fp32 and LLM.int8 models (and int8's on the fit windows), one model at a time."""
    out = {}
    for quantization in ("none", "int8"):
        model, _ = load_quantized_model(args.model, quantization)
        name = "fp32" if quantization == "none" else quantization
        out[name] = compute_perplexity(model, held_out, args.batch_size)
        if quantization == "int8":
            out["int8_fit"] = compute_perplexity(model, fit, args.batch_size)
        print(f"{name}: {out[name]:.3f}", flush=True)
        del model
    return out


def main() -> None:
    """Baselines, then one closed-form init and its perplexities per calibration size; writes after every size."""
    args = make_parser().parse_args()
    torch.set_num_threads(args.threads)
    add_bos = is_embedded_model(args.model) and EMBEDDED_MODELS[args.model.lower()].needs_bos
    # 1. Windows, checked before any model runs
    _, tokenizer = load_quantized_model(args.model, "none")
    all_calibration, held_out, documents = calibration_and_held_out(tokenizer, args.calibration_data, args.window,
                                                                    args.eval_windows, add_bos)
    counts = parse_sizes(args.calibration_tokens, args.window, all_calibration.shape[0],
                         "C4" if args.calibration_data == "c4" else "Wikipedia (after the held-out windows)")
    fit = all_calibration[: min(args.fit_windows, counts[0])]
    settings = {**vars(args), "add_bos": add_bos, "calibration_windows_available": all_calibration.shape[0],
                "eval_windows": int(held_out.shape[0]), "fit_windows": int(fit.shape[0]), "torch": torch.__version__,
                "platform": platform.processor() or platform.machine()}
    if args.calibration_data == "c4":
        settings.update(c4_documents=len(documents), c4_windows=all_calibration.shape[0],
                        c4_tokens=sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
                                      for text in documents))
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, "calibration_size" + ("" if args.model == "smollm2-135m" else f"-{args.model}")
                        + ("" if args.calibration_data == "c4" else f"-{args.calibration_data}"))
    done = {row["tokens"]: row for row in load_finished_rows(stem, settings)}
    counts = [count for count in counts if count * args.window not in done]
    result = {"settings": settings, "baselines": measure_baselines(args, held_out, fit), "rows": list(done.values())}
    # 2. NF4 + LoRA once; B = 0 first, then one closed-form init per size (each overwrites A and B completely)
    model = peft_model(args.model, "nf4", rank=args.rank)
    base = result["baselines"]
    with model.disable_adapter():
        base["nf4"] = compute_perplexity(model, held_out, args.batch_size)
        base["nf4_fit"] = compute_perplexity(model, fit, args.batch_size)
    for count in counts:
        started = time.perf_counter()
        config = QuAILoRAConfig(solver="closed_form", calibration_samples=None, calibration_length=args.window,
                                calibration_batch_size=args.batch_size, show_progress=False)
        report = quailora_init(model, all_calibration[:count], config)
        seconds = time.perf_counter() - started
        totals = report.totals()
        ppl = compute_perplexity(model, held_out, args.batch_size)
        fit_ppl = compute_perplexity(model, fit, args.batch_size)
        row = {"tokens": count * args.window, "windows": count, "perplexity": ppl,
               "gap_closed": gap_closed(base["nf4"], ppl, base["int8"]), "fit_perplexity": fit_ppl,
               "fit_gap_closed": gap_closed(base["nf4_fit"], fit_ppl, base["int8_fit"]),
               "relative_calibrated_error": totals["calibrated_error_result"] / totals["calibrated_error_qlora"],
               "init_seconds": seconds}
        result["rows"] = sorted(result["rows"] + [row], key=lambda entry: entry["tokens"])
        print(row, flush=True)
        write_results(stem, to_markdown(result), result)  # after every size: an interrupted run keeps what it finished
    print("\n" + to_markdown(result))


if __name__ == "__main__":
    main()

"""A float32 solve against the float64 optimum, on the real layers of the embedded models (SmolLM2-135M, Gemma-3-270m).

A float32 solve halves the solve's workspace (two in×in matrices), the largest term of the init's peak at 32B-70B
(docs/memory.md). The closed form is exact in exact arithmetic, so the only question is rounding: per LoRA layer,
the calibrated objective `tr[(E − M) H (E − M)ᵀ]` of the float32 solution over that of the float64 solution, both
evaluated in float64 with the same (undamped) H. Target (issue 34): every layer within 1.001×.

Each model is loaded in NF4 with LoRA r on every linear layer; one streamed `quailora_init` (float64 solves, the
default) keeps its Gram matrices (`keep_gram_statistics=True`, float32 as by default) on C4 windows; then every layer
is solved again in both dtypes from the same E (formed in float64 from the checkpoint's W and the exact Q) and H.

Usage (the run recorded in bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python bench/bench_solve_dtype.py --threads 1
"""

from __future__ import annotations

import argparse
import time


def compare_model(name: str, args) -> list[dict]:
    """Per LoRA layer: objective(float32 solve) / objective(float64 solve), and the two solve times."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_quailora import QuAILoRAConfig, load_quantized_model, make_token_windows, quailora_init
    from hf_quailora.embedded.data import load_dataset_any
    from hf_quailora.embedded.models import resolve
    from hf_quailora.quailora.solvers import calibrated_error, solve_closed_form
    from hf_quailora.quailora.weights import FullPrecisionWeights
    from hf_quailora.quantization import dequantize_weight

    path = resolve(name)
    model, tokenizer = load_quantized_model(path, "nf4")
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear",
                                             lora_dropout=0.0))
    windows = make_token_windows(tokenizer, list(load_dataset_any("c4")["text"]), args.length, args.windows)
    report = quailora_init(model, windows, QuAILoRAConfig(keep_gram_statistics=True, show_progress=False))
    stats = report.gram_statistics
    weights = FullPrecisionWeights.from_any(path).use_key_mapping(model)
    rows = []
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        Q = dequantize_weight(module.get_base_layer()).to(torch.float64)
        E = weights.get(layer.name).to(torch.float64) - Q
        H = stats.for_layer(layer.name)  # float32, as the init accumulates it
        H64 = H.to(torch.float64)
        objective, seconds = {}, {}
        for dtype in (torch.float64, torch.float32):
            started = time.perf_counter()
            B, A, _ = solve_closed_form(E.to(dtype), H, layer.rank, args.damping)
            seconds[dtype] = time.perf_counter() - started
            objective[dtype] = float(calibrated_error(E, H64, B.to(torch.float64), A.to(torch.float64)))
        rows.append({"model": name, "layer": layer.name.removeprefix("base_model.model."), "shape": layer.shape,
                     "ratio": objective[torch.float32] / objective[torch.float64],
                     "seconds_64": seconds[torch.float64], "seconds_32": seconds[torch.float32]})
    return rows


def to_markdown(rows: list[dict], args) -> str:
    lines = [
        f"Real layers, NF4, LoRA r={args.rank} on every linear layer, closed form, damping {args.damping}, float32 "
        f"Gram matrices from {args.windows} × {args.length} C4 tokens; objective evaluated in float64; torch threads "
        f"{args.threads}.",
        "",
        "| model | layers | widest input | max objective ratio float32 / float64 | median | layers over 1.001 | "
        "solve time float32 / float64 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        ratios = sorted(row["ratio"] for row in mine)
        time_ratio = sum(row["seconds_32"] for row in mine) / sum(row["seconds_64"] for row in mine)
        lines.append(f"| {model} | {len(mine)} | {max(row['shape'][1] for row in mine)} | {ratios[-1]:.6f} | "
                     f"{ratios[len(ratios) // 2]:.6f} | {sum(r > 1.001 for r in ratios)} | {time_ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results/solve_dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if __package__:
        from ._common import write_results
    else:
        from _common import write_results
    rows = [row for name in args.models.split(",") for row in compare_model(name.strip(), args)]
    table = to_markdown(rows, args)
    write_results(args.output, table + "\n", {"settings": vars(args), "rows": rows})
    print(table)


if __name__ == "__main__":
    main()

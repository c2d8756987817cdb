"""How steady the learning-rate rule's measurement is across the train batches it is taken on (issue 36).

`QuAILoRAInitCallback`'s default `lr_scale="auto"` (hf_quailora/quailora/first_step.py) takes Adam's first step on four
sequences of the train batches and measures its KL on four others, against the start's correction. This script
initialises one QuAILoRA start the way `recipes/alpaca.py` does (32 windows of 256 tokens of the training examples)
and repeats that measurement on `--repeats` disjoint sets of 8 Alpaca training examples, tokenized as the recipe's
batches (prompt and response, 4 per batch, padded, at most 256 tokens). It prints S / C at each factor per set, and
the factor each budget would pick, so that the budget can be read against the spread.

Usage (each model in a fresh process; ≈ 5–10 min each on one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_lr_rule.py --model smollm2-135m
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_lr_rule.py --model gemma3-270m --report
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_lr_rule.py --model gemma3-270m --rank 16  # lr_rule-gemma3-270m-r16.json
"""

from __future__ import annotations

import argparse
import os
import statistics


if __package__:
    from ._common import peft_model
    from .bench_lr_step import store_and_report
else:
    from _common import peft_model
    from bench_lr_step import store_and_report


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BUDGETS = (0.2, 0.5, 0.8)


def measure(model_name: str, rank: int, lr: float, repeats: int, seed: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from hf_quailora import QuAILoRAConfig, make_token_windows, quailora_first_step, quailora_init, resolve
    from hf_quailora.embedded.data import load_alpaca_sft, split_holdout
    from hf_quailora.tokens import tokenizer_adds_bos

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(resolve(model_name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, _ = split_holdout(load_alpaca_sft("alpaca"), 200)
    texts = [train[i]["prompt"] + train[i]["completion"] for i in range(len(train))]
    calibration = make_token_windows(tokenizer, texts, 256, 32, add_bos=tokenizer_adds_bos(tokenizer))
    model = peft_model(model_name, "nf4", rank=rank, seed=seed, task_type="CAUSAL_LM")
    quailora_init(model, calibration, QuAILoRAConfig(calibration_samples=None, calibration_length=256,
                                                     show_progress=False))
    rows = []
    for k in range(repeats):
        chunk = texts[8 * k: 8 * k + 8]
        batches = [dict(tokenizer(chunk[i:i + 4], return_tensors="pt", padding=True, truncation=True,
                                  max_length=256)) for i in (0, 4)]
        step = quailora_first_step(model, batches, lr)
        rows.append({"set": k, "correction_kl": step.correction_kl,
                     "ratios": {str(scale): step.ratio(scale) for scale in step.step_kl}})
    return {"model": model_name, "rank": rank, "learning_rate": lr, "seed": seed, "repeats": repeats, "rows": rows,
            "threads": torch.get_num_threads()}


def pick(ratios: dict, budget: float) -> float:
    """The factor `quailora_lr_scale` picks from these ratios at `budget`."""
    for scale in sorted((float(s) for s in ratios), reverse=True):
        if ratios[str(scale)] <= budget:
            return scale
    return min(float(s) for s in ratios)


def report(results: list[dict]) -> str:
    lines = ["| model | r | sets | S / C at ×1, mean ± std (min–max) | at ×0.5 | " +
             " | ".join(f"factors at budget {b:g}" for b in BUDGETS) + " |",
             "|---|---:|---:|---|---|" + "---|" * len(BUDGETS)]
    for r in results:
        one = [row["ratios"]["1.0"] for row in r["rows"]]
        half = [row["ratios"]["0.5"] for row in r["rows"]]

        def cell(values):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f} ({min(values):.3f}–{max(values):.3f})"
        picks = [", ".join(f"×{pick(row['ratios'], b):g}" for row in r["rows"]) for b in BUDGETS]
        lines.append(f"| {r['model']} | {r['rank']} | {len(one)} | {cell(one)} | {cell(half)} | " + " | ".join(picks) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results_dir", default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.repeats < 1 or not args.learning_rate > 0:
        parser.error("--rank and --repeats must be at least 1 and --learning_rate positive")
    result = None if args.report else measure(args.model, args.rank, args.learning_rate, args.repeats, args.seed)
    slug = os.path.basename(args.model.rstrip("/")) + ("" if args.rank == 64 else f"-r{args.rank}")
    store_and_report(args.results_dir, "lr_rule", slug, result, report,
                     "The learning-rate rule's measurement across train batches")


if __name__ == "__main__":
    main()

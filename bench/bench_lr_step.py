"""How far one Adam step moves the LoRA product from a QuAILoRA start, against peft's default start (issue 36).

A QuAILoRA start has both factors non-zero, peft's default start B = 0 and a small random A, so the same learning
rate may move the product `ΔW = B'A' − BA` further from one than from the other. This script measures that ratio on a
real model and compares it with the ratio `hf_quailora.quailora_step_ratio` predicts from the factors alone:

- `measured`: ‖ΔW‖_F summed over every adapted layer after K AdamW steps (lr 2e-4, the recipe's default) on the same
  Alpaca training batches, QuAILoRA start over peft's default start (same seed, same base).
- `predicted`: `quailora_step_ratio(model)` on the QuAILoRA start.
- `row_norms`: the median row norm of QuAILoRA's A per layer type (peft's default: 1/√3 ≈ 0.577).

And the same steps in what the model predicts (hf_quailora/quailora/first_step.py):

- `qlora_kl`, `quailora_kl`: the mean per-token KL(start ‖ after k steps) on 8 held-out Alpaca examples;
- `correction_kl`: KL(QuAILoRA start ‖ NF4 base) on the same examples, the size of the start's correction;
- `rule`: what `quailora_lr_scale` (the callback's `lr_scale="auto"`) measures and picks at this learning rate, on
  the 32 C4 calibration windows and on 32 windows of the training examples (the recipes' default calibration).

The calibration windows start with BOS where the tokenizer starts texts with it (the embedded Gemma), as in
`bench/compare_init`.

Usage (each model in a fresh process; ≈ 3–8 min each on one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_lr_step.py --model smollm2-135m
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_lr_step.py --model gemma3-270m --report

`--report` prints the table of every JSON written so far (bench/results/lr_step-*.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import peft_model, write_json, write_results
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import peft_model, write_json, write_results


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def lora_products(model) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """The product B A × scaling of every LoRA layer, in float32 (detached copies)."""
    from hf_quailora import find_lora_layers

    return {name: (m.lora_B["default"].weight.detach().float() @ m.lora_A["default"].weight.detach().float())
            * m.scaling["default"] for name, m in find_lora_layers(model).items()}


def row_norms(model) -> dict[str, float]:
    """Median row norm of the adapter's A per layer type (`q_proj`, ...), averaged over the layers of that type."""
    from hf_quailora import find_lora_layers

    norms: dict[str, list[float]] = {}
    for name, module in find_lora_layers(model).items():
        a = module.lora_A["default"].weight.detach().float()
        norms.setdefault(name.rsplit(".", 1)[-1], []).append(float(a.norm(dim=1).median()))
    return {kind: sum(values) / len(values) for kind, values in norms.items()}


def log_probs(model, windows) -> list["torch.Tensor"]:  # noqa: F821
    """The model's next-token log-probabilities on each held-out window (eval mode, no grad)."""
    import torch

    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(**window).logits[0].float(), dim=-1) for window in windows]


def mean_kl(reference: list, other: list) -> float:
    """Mean per-token KL(reference ‖ other) in nats; both are `log_probs` of the same windows."""
    total = sum(float((ref.exp() * (ref - cur)).sum()) for ref, cur in zip(reference, other))
    return total / sum(ref.shape[0] for ref in reference)


def step_distance(model, batches, lr: float, windows) -> tuple[list[float], list[float]]:
    """After each of `len(batches)` AdamW steps (cumulative, from the start): ‖ΔW‖_F over every LoRA layer, and the
    mean per-token KL(start ‖ now) on the held-out `windows`: the same step in function space."""
    import torch

    start, reference = lora_products(model), log_probs(model, windows)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    distances, kls = [], []
    for batch in batches:
        model.train()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = lora_products(model)
        distances.append(float(sum((now[k] - start[k]).pow(2).sum() for k in start) ** 0.5))
        kls.append(mean_kl(reference, log_probs(model, windows)))
    return distances, kls


def measure(model_name: str, rank: int, steps: int, lr: float, seed: int, calibration_windows: int,
            eval_texts: int = 8) -> dict:
    import torch
    from transformers import AutoTokenizer

    from hf_quailora import (
        QuAILoRAConfig,
        load_dataset_any,
        make_token_windows,
        quailora_init,
        quailora_lr_scale,
        quailora_step_ratio,
        resolve,
    )
    from hf_quailora.embedded.data import load_alpaca_sft, split_holdout
    from hf_quailora.quailora.calibration import make_calibration_batches
    from hf_quailora.tokens import tokenizer_adds_bos

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(resolve(model_name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out = split_holdout(load_alpaca_sft("alpaca"), 200)
    windows = [dict(tokenizer(held_out[i]["prompt"] + held_out[i]["completion"], return_tensors="pt",
                              truncation=True, max_length=256)) for i in range(eval_texts)]
    texts = [train[i]["prompt"] + train[i]["completion"] for i in range(4 * steps)]
    batches = [tokenizer(texts[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=256)
               for i in range(0, len(texts), 4)]
    add_bos = tokenizer_adds_bos(tokenizer)  # the embedded Gemma's tokenizer starts every text with BOS
    calibration = make_token_windows(tokenizer, load_dataset_any("c4")["text"], 256, calibration_windows,
                                     add_bos=add_bos)
    result = {"model": model_name, "rank": rank, "steps": steps, "learning_rate": lr, "seed": seed,
              "calibration_windows": calibration_windows, "add_bos": add_bos, "threads": torch.get_num_threads()}
    qlora_start = None
    for arm in ("qlora", "quailora"):  # qlora first: its start (the NF4 base) is the correction's reference
        started = time.perf_counter()
        model = peft_model(model_name, "nf4", rank=rank, seed=seed, task_type="CAUSAL_LM")
        if arm == "quailora":
            quailora_init(model, calibration, QuAILoRAConfig(calibration_samples=None, calibration_length=256,
                                                             show_progress=False))
            result["predicted"] = quailora_step_ratio(model)
            result["row_norms"] = row_norms(model)
            # the correction's size in function space: KL(QuAILoRA start ‖ NF4 base, which is QLoRA's start)
            result["correction_kl"] = mean_kl(log_probs(model, windows), qlora_start)
            # the rule QuAILoRAInitCallback applies (lr_scale="auto"), measured on C4 windows (this start's
            # calibration) and on training examples (the recipes' default calibration)
            train_windows = make_token_windows(tokenizer, texts, 256, calibration_windows, add_bos=add_bos)
            result["rule"] = {}
            for source, ids in (("c4", calibration), ("alpaca_train", train_windows)):
                scale, step = quailora_lr_scale(model, make_calibration_batches(ids), lr)
                result["rule"][source] = {"scale": scale, "correction_kl": step.correction_kl,
                                          "step_kl": {str(k): v for k, v in step.step_kl.items()},
                                          "tokens": step.tokens}
        else:
            qlora_start = log_probs(model, windows)
        result[f"{arm}_distance"], result[f"{arm}_kl"] = step_distance(model, [dict(b) for b in batches], lr,
                                                                       windows)
        result[f"{arm}_seconds"] = time.perf_counter() - started
        del model
    result["eval_texts"] = eval_texts
    result["measured"] = [q / n for q, n in zip(result["quailora_distance"], result["qlora_distance"])]
    result["kl_ratio"] = [q / n for q, n in zip(result["quailora_kl"], result["qlora_kl"])]
    result["kl_over_correction"] = [q / result["correction_kl"] for q in result["quailora_kl"]]
    return result


def store_and_report(results: str, prefix: str, slug: str, result: dict | None, report_rows, title: str) -> list[dict]:
    """Write `result` (unless `None`: `--report`) as `<prefix>-<slug>.json`, then print and write
    `<prefix>.md` / `.json` with `report_rows` over every stored result (this script's and bench_lr_rule.py's)."""
    if result is not None:
        print(write_json(os.path.join(results, f"{prefix}-{slug}.json"), result))
    rows = stored(results, prefix)
    table = report_rows(rows)
    print(table)
    write_results(os.path.join(results, prefix), f"# {title}\n\n" + table + "\n", {"rows": rows})
    return rows


def stored(results: str, prefix: str = "lr_step") -> list[dict]:
    """Every `<prefix>-<model>.json` under `results` (bench_lr_rule.py reads its own with `prefix="lr_rule"`)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results, f"{prefix}-*.json"))):
        with open(path) as handle:
            rows.append(json.load(handle))
    return rows


def report(rows: list[dict]) -> str:
    """The markdown tables of `rows` (`stored`): the step in weight space, then in what the model predicts."""
    lines = ["| model | r | lr | BOS | measured ratio after 1 step | after K steps (K) | predicted "
             "(`quailora_step_ratio`) | QuAILoRA's A, median row norm per layer type (peft: 0.577) | threads |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        norms = ", ".join(f"{kind} {value:.2f}" for kind, value in r.get("row_norms", {}).items()) or "–"
        lines.append(f"| {r['model']} | {r['rank']} | {r['learning_rate']:g} | {r.get('add_bos', False)} | "
                     f"{r['measured'][0]:.3f} | {r['measured'][-1]:.3f} ({r['steps']}) | {r['predicted']:.3f} | "
                     f"{norms} | {r['threads']} |")
    lines += ["", "In what the model predicts (KL in nats per token; correction: KL(QuAILoRA start ‖ NF4 base)):", "",
              "| model | correction, held-out Alpaca | 1 AdamW step, QLoRA start | 1 step, QuAILoRA start | "
              "QuAILoRA's step / correction | rule (`quailora_lr_scale`), C4 windows: step / correction → scale | "
              "rule, training windows |",
              "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "rule" not in r:
            continue
        rule = {source: f"{v['step_kl']['1.0'] / v['correction_kl']:.3f} → ×{v['scale']:g}"
                for source, v in r["rule"].items()}
        lines.append(f"| {r['model']} | {r['correction_kl']:.4f} | {r['qlora_kl'][0]:.4f} | {r['quailora_kl'][0]:.4f} | "
                     f"{r['kl_over_correction'][0]:.3f} | {rule['c4']} | {rule['alpaca_train']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calibration_windows", type=int, default=32)
    parser.add_argument("--results_dir", default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args(argv)
    for name in ("rank", "steps", "calibration_windows"):  # before any model loads
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    result = None if args.report else measure(args.model, args.rank, args.steps, args.learning_rate, args.seed,
                                              args.calibration_windows)
    store_and_report(args.results_dir, "lr_step", os.path.basename(args.model.rstrip("/")), result, report,
                     "One AdamW step from a QuAILoRA start")


if __name__ == "__main__":
    main()

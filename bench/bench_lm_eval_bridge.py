"""Rank sweep cost: one `evaluate_ranks` call over k ranks vs k separate evaluations.

    python bench/bench_lm_eval_bridge.py                        # SmolLM2-135M NF4, r=16, k=4 ranks, 2 threads
    python bench/bench_lm_eval_bridge.py --ranks 1 2 4 8 16 --limit 8 --threads 1

Three timings, same process, same task and documents:
  sweep           evaluate_ranks(model, ranks) — the model loaded once, one lm-eval run per rank;
  k × in-memory   evaluate_ranks(model, [b]) called once per rank (the bridge's per-call overhead);
  k × from disk   lm-eval's simple_evaluate(model="hf-dynrank", pretrained=…, peft=…, rank=b) per rank, which
                  loads the base and the adapter every time (what evaluating exported adapters one by one costs).
Target (issue #4): sweep / (k × one evaluation) ≤ 1.05.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from lm_eval import simple_evaluate

from hf_quailora import DynamicRankMetadata, resolve
from hf_quailora.evaluation.lm_eval_bridge import evaluate_ranks, resolve_tasks
from hf_quailora.quantization import load_quantized_model


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import peft_model, write_text
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import peft_model, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--task", default="quailora_wiki_ppl")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="bench/results/lm_eval_bridge.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    model, tokenizer = load_quantized_model(path, args.quantization)
    model = peft_model(model, rank=max(args.ranks), seed=0, init_lora_weights=False)
    adapter = tempfile.mkdtemp(prefix="bench-adapter-")
    model.save_pretrained(adapter)
    DynamicRankMetadata.for_model(model, max_rank=max(args.ranks), rank_scaling="per_rank").save(adapter)
    _, manager = resolve_tasks(args.task)
    options = dict(limit=args.limit, show_progress=False, bootstrap_iters=0)

    evaluate_ranks(model, tokenizer, [args.ranks[0]], args.task, **options)  # warm-up (task build, caches)
    started = time.perf_counter()
    evaluate_ranks(model, tokenizer, args.ranks, args.task, **options)
    sweep = time.perf_counter() - started
    singles = []
    for b in args.ranks:
        started = time.perf_counter()
        evaluate_ranks(model, tokenizer, [b], args.task, **options)
        singles.append(time.perf_counter() - started)
    from_disk = []
    for b in args.ranks:
        started = time.perf_counter()
        simple_evaluate(model="hf-dynrank", model_args=f"pretrained={path},peft={adapter},rank={b},"
                        f"quantization={args.quantization}", tasks=[args.task], task_manager=manager,
                        limit=args.limit, log_samples=False, bootstrap_iters=0, device="cpu")
        from_disk.append(time.perf_counter() - started)
    k = len(args.ranks)
    lines = [
        f"{args.model} ({args.quantization}), LoRA r={max(args.ranks)}, task {args.task} (limit {args.limit}), "
        f"k={k} ranks {args.ranks}, torch {torch.__version__}, {args.threads} threads.",
        "",
        "| run | seconds | ratio to the sweep |",
        "|---|---:|---:|",
        f"| sweep: evaluate_ranks over {k} ranks | {sweep:.1f} | 1.00 |",
        f"| {k} × evaluate_ranks([b]) in memory | {sum(singles):.1f} | {sum(singles) / sweep:.2f} |",
        f"| {k} × hf-dynrank from disk (load + evaluate) | {sum(from_disk):.1f} | {sum(from_disk) / sweep:.2f} |",
        "",
        f"sweep / (k × one in-memory evaluation) = {sweep / sum(singles):.3f} (target ≤ 1.05); "
        f"sweep / (k × load + evaluate) = {sweep / sum(from_disk):.3f}.",
    ]
    table = "\n".join(lines)
    print(table)
    write_text(args.output, table + "\n")


if __name__ == "__main__":
    main()

"""Benchmark DynamicRankTrainer against trl's SFTTrainer with a plain LoRA, on the real SmolLM2-135M (NF4).

Three parts, each printed as a Markdown table:

1. Speed: median optimizer-step time of `SFTTrainer` + plain LoRA (rank `r`), `DynamicRankTrainer` pinned at rank r,
   and `DynamicRankTrainer` sampling ranks uniformly; same data, same process, alternating rounds.
2. Memory: peak RSS of each of the three in a fresh subprocess (a CPU has no per-phase allocator peak), and the
   bytes autograd saves for backward in one micro-step at rank r (deterministic).
3. Quality: one DynamicRankTrainer run of N steps versus separate plain LoRA runs at ranks 1, 2, 4, 8, 16 with N
   steps each, eval loss at every rank on held-out Alpaca examples, and compute in optimizer steps.
   `--quailora` adds: the eval loss at every rank right after QuAILoRA initialisation (no training) under the
   constant scaling and under `α/b`.

Usage (the run recorded in bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python bench/bench_dynamic_rank.py --threads 1

All runs use `torch.set_num_threads(--threads)` (1 by default: the project machine has 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from hf_quailora.dynamic_rank.spec import UPDATE_RULES
from hf_quailora.quantization import QUANTIZATIONS


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import peft_model
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import peft_model


RANKS = (1, 2, 4, 8, 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4", choices=list(QUANTIZATIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated LoRA target modules")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--speed-steps", type=int, default=4, help="timed steps per configuration and round")
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--quality-steps", type=int, default=20, help="optimizer steps of every quality run")
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--update-rule", default="nested", choices=list(UPDATE_RULES))
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: speed,memory,quality")
    parser.add_argument("--quailora", action="store_true", help="also measure QuAILoRA init under constant vs α/b")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def alpaca_texts(start: int, count: int) -> list[str]:
    from hf_quailora import load_dataset_any

    data = load_dataset_any("alpaca").select(range(start, start + count))
    return [
        f"### Instruction:\n{row['instruction']}\n{row['input']}\n### Response:\n{row['output']}".replace("\n\n", "\n")
        for row in data
    ]


class StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times = []
                self._start = None

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def build(args, kind: str, rank: int, steps: int, output_dir: str, train_texts, eval_texts, callbacks=None):
    """kind: 'lora' (SFTTrainer + plain LoRA of `rank`), 'dyn-max' (DynamicRankTrainer pinned at `rank`),
    'dyn' (DynamicRankTrainer, uniform over 1..rank)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer
    from hf_quailora.quantization import load_quantized_model

    model, tokenizer = load_quantized_model(args.model, quantization=args.quantization)
    model = peft_model(model, rank=rank, alpha=args.lora_alpha, target_modules=args.targets, seed=0)
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8, learning_rate=args.learning_rate, max_length=args.max_length,
        logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=0, lr_scheduler_type="constant", warmup_steps=0,
    )
    common["disable_tqdm"] = True  # progress bars and the log dicts they print would mix into the Markdown on stdout
    train, held_out = Dataset.from_dict({"text": train_texts}), Dataset.from_dict({"text": eval_texts})
    if kind == "lora":
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, callbacks=callbacks)
    else:
        extra = dict(update_rule=args.update_rule, eval_ranks=[b for b in RANKS if b <= rank])
        if kind == "dyn-max":
            extra.update(rank_distribution="weighted", rank_choices=[rank], rank_weights=[1.0])
        trainer = DynamicRankTrainer(model, args=DynamicRankConfig(**common, **extra), train_dataset=train,
                                     eval_dataset=held_out, processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def saved_tensor_bytes(trainer) -> int:
    """Bytes autograd keeps for backward in one forward of a training batch (at the trainer's max rank)."""
    from hf_quailora import DynamicRankTrainer

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if isinstance(trainer, DynamicRankTrainer):
            with trainer.use_rank(trainer.max_rank):
                trainer.compute_loss(trainer.model, dict(batch))
        else:
            trainer.compute_loss(trainer.model, dict(batch))
    return total


def speed(args, train_texts, eval_texts):
    kinds = ["lora", "dyn-max", "dyn"]
    times = {kind: [] for kind in kinds}
    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.speed_rounds):
            for kind in kinds:
                timer = StepTimer()
                trainer = build(args, kind, args.max_rank, args.speed_steps + 1, os.path.join(tmp, kind), train_texts,
                                eval_texts, callbacks=[timer])
                if kind not in saved:
                    saved[kind] = saved_tensor_bytes(trainer)
                trainer.train()
                times[kind].extend(timer.times[1:])  # first step: warm-up
                print(f"  round {round_index} {kind}: {[round(t, 3) for t in timer.times]}", file=sys.stderr)
    return {kind: statistics.median(values) for kind, values in times.items()}, saved


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args, kind):
    """Peak RSS during training only: Linux resets the high-water mark (VmHWM) on `echo 5 > clear_refs`, so model
    loading (which peaks higher than training on a CPU) does not hide the training peak."""
    import gc

    train_texts, eval_texts = alpaca_texts(0, 64), alpaca_texts(900, 8)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, kind, args.max_rank, 3, tmp, train_texts, eval_texts)
        load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _proc_status_mib("VmRSS")
        trainer.train()
        peak = _proc_status_mib("VmHWM")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "rss_before_train_mib": before, "load_peak_mib": load_peak,
                      "ru_maxrss_after_mib": after}))


def memory(args):
    results = {}
    for kind in ["lora", "dyn-max", "dyn"]:
        command = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind] + [
            a for a in sys.argv[1:] if a != "--quailora"
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    return results


def quality(args, train_texts, eval_texts):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = build(args, "dyn", args.max_rank, args.quality_steps, os.path.join(tmp, "dyn"), train_texts,
                        eval_texts)
        base = trainer.evaluate()
        trainer.train()
        metrics = trainer.evaluate()
        results["dyn"] = {b: metrics[f"eval_loss@r{b}"] for b in RANKS if b <= args.max_rank}
        results["dyn_seconds"] = time.perf_counter() - start
        results["base"] = base["eval_loss"]
        results["dyn_ranks"] = [rank for _, rank in trainer.rank_history]
        results["lora"], results["lora_seconds"] = {}, 0.0
        for b in RANKS:
            if b > args.max_rank:
                continue
            start = time.perf_counter()
            trainer = build(args, "lora", b, args.quality_steps, os.path.join(tmp, f"lora{b}"), train_texts,
                            eval_texts)
            trainer.train()
            results["lora"][b] = trainer.evaluate()["eval_loss"]
            results["lora_seconds"] += time.perf_counter() - start
            print(f"  LoRA r={b}: {results['lora'][b]:.4f}", file=sys.stderr)
    return results


def quailora_scaling(args, eval_texts):
    """Eval loss at every rank right after QuAILoRA init of a rank-r adapter: constant scaling vs α/b."""
    from hf_quailora import QuAILoRAConfig, load_dataset_any, quailora_init

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, "dyn", args.max_rank, 1, tmp, alpaca_texts(0, 8), eval_texts)
        before = trainer.evaluate()["eval_loss"]
        c4 = list(load_dataset_any("c4")["text"])[:32]
        quailora_init(trainer.model, c4,
                      QuAILoRAConfig(calibration_samples=32, calibration_length=128, show_progress=False),
                      tokenizer=trainer.processing_class)
        rows = {}
        for scaling in ("constant", "per_rank"):
            trainer.rank_scaling = scaling  # the trainer resolves its scaling once, at __init__: set what it uses
            metrics = trainer.evaluate()
            rows[scaling] = {b: metrics[f"eval_loss@r{b}"] for b in RANKS if b <= args.max_rank}
    return before, rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_probe:
        return memory_probe(args, args.memory_probe)
    skip = set(filter(None, args.skip.split(",")))
    train_texts, eval_texts = alpaca_texts(0, 800), alpaca_texts(900, args.eval_examples)
    print(f"# DynamicRankTrainer benchmark\n\nModel {args.model} ({args.quantization}), LoRA targets {args.targets}, "
          f"max rank {args.max_rank}, alpha {args.lora_alpha}, batch {args.batch_size} x {args.max_length} tokens, "
          f"torch threads {args.threads}, update rule {args.update_rule}, scaling alpha/b.\n")

    if "speed" not in skip:
        medians, saved = speed(args, train_texts, eval_texts)
        print(f"## Speed ({args.speed_rounds} rounds x {args.speed_steps} timed steps, median)\n")
        print("| trainer | step time (s) | ratio vs SFTTrainer+LoRA | autograd saved bytes (MiB) | ratio |")
        print("|---|---|---|---|---|")
        labels = {"lora": f"SFTTrainer + LoRA r={args.max_rank}",
                  "dyn-max": f"DynamicRankTrainer at b={args.max_rank}",
                  "dyn": f"DynamicRankTrainer, b ~ U[1,{args.max_rank}]"}
        for kind in medians:
            print(f"| {labels[kind]} | {medians[kind]:.3f} | {medians[kind] / medians['lora']:.3f} | "
                  f"{saved[kind] / 2**20:.1f} | {saved[kind] / saved['lora']:.3f} |")
        print()
    if "memory" not in skip:
        peaks = memory(args)
        print("## Peak memory during training (fresh process each, 3 steps, peak reset after loading)\n")
        print("| trainer | RSS before train (MiB) | peak RSS in train (MiB) | increase (MiB) | increase ratio |")
        print("|---|---|---|---|---|")
        base = peaks["lora"]["peak_rss_mib"] - peaks["lora"]["rss_before_train_mib"]
        for kind, values in peaks.items():
            increase = values["peak_rss_mib"] - values["rss_before_train_mib"]
            print(f"| {kind} | {values['rss_before_train_mib']:.0f} | {values['peak_rss_mib']:.0f} | {increase:.0f} | "
                  f"{increase / base:.3f} |")
        print()
    if "quality" not in skip:
        results = quality(args, train_texts, eval_texts)
        print(f"## Quality ({args.quality_steps} optimizer steps per run, {args.eval_examples} held-out examples)\n")
        print(f"Eval loss before training (B = 0, every rank): {results['base']:.4f}. "
              f"Ranks drawn by the dynamic run: {results['dyn_ranks']}.\n")
        print("| rank | DynamicRank eval loss | separate LoRA eval loss | ratio |")
        print("|---|---|---|---|")
        for b, loss in results["dyn"].items():
            print(f"| {b} | {loss:.4f} | {results['lora'][b]:.4f} | {loss / results['lora'][b]:.4f} |")
        n_runs = len(results["lora"])
        print(f"\nCompute: DynamicRank {args.quality_steps} optimizer steps ({results['dyn_seconds']:.0f} s wall, "
              f"incl. load and 2 evaluations at {n_runs} ranks); separate LoRAs {n_runs} x {args.quality_steps} = "
              f"{n_runs * args.quality_steps} steps ({results['lora_seconds']:.0f} s wall, incl. loads and 1 "
              f"evaluation each): {1 / n_runs:.2f} of the steps.\n")
    if args.quailora:
        before, rows = quailora_scaling(args, eval_texts)
        print("## QuAILoRA init (no training): eval loss at every rank\n")
        print(f"NF4 model with B = 0: {before:.4f}\n")
        print("| rank | constant scaling (α/r) | per-rank scaling (α/b) |")
        print("|---|---|---|")
        for b in rows["constant"]:
            print(f"| {b} | {rows['constant'][b]:.4f} | {rows['per_rank'][b]:.4f} |")
        print()


if __name__ == "__main__":
    main()

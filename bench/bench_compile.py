"""Dynamic rank under torch.compile: recompiles over many ranks, and the cost of a compiled and an uncompiled step.

Every case runs in a fresh process (same thread count) on a small random Llama (2 layers, hidden 256) with LoRA
r = `--rank` on all linear layers, trained by a `Trainer` on random tokens:

- `dyn-aot-eager`: `DynamicRankTrainer(torch_compile=True)` with the `aot_eager` backend; every rank 1..r drawn
  once after a warm-up step, then `evaluate()` at several ranks twice; counts the graphs dynamo compiled after the
  warm-up (the first step and the first evaluation).
- `slice-aot-eager`: the same with the slicing path (today's `use_rank` before static truncation), `--slice-ranks`
  ranks only: one graph per rank until dynamo's recompile limit, then eager.
- `sft-inductor` / `dyn-inductor`: median step time of a compiled (inductor) `SFTTrainer` LoRA step and of a compiled
  `DynamicRankTrainer` step drawing ranks uniformly from 1..r, after `--warm-up` steps.
- `eager-slice` / `eager-mask`: median step time of an uncompiled `DynamicRankTrainer` on the slicing path (the
  default without torch_compile) and on the static mask path, with the same rank sequence; their losses must agree.
  `sft-eager`: an uncompiled `SFTTrainer` LoRA step, for scale.

Usage (the run recorded in bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python bench/bench_compile.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


CASES = [
    "dyn-aot-eager", "slice-aot-eager", "sft-inductor", "dyn-inductor", "sft-eager", "eager-slice", "eager-mask",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the timed cases")
    parser.add_argument("--warm-up", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--slice-ranks", type=int, default=10, help="distinct ranks of the slicing case")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return parser.parse_args(argv)


def tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(vocab - 4)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_trainer(args, case: str, output_dir: str, callbacks):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer

    vocab = 1024
    tokenizer = tiny_tokenizer(vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear",
                                             init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 4, (127,), generator=generator))
             for _ in range(64)]
    data = Dataset.from_dict({"text": texts})
    compiled = "inductor" in case or "aot-eager" in case
    common = dict(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-4, max_length=128, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
    )
    if compiled:  # setting a backend turns torch_compile on (TrainingArguments)
        common.update(torch_compile=True, torch_compile_backend="inductor" if "inductor" in case else "aot_eager")
    if case.startswith("sft"):
        return SFTTrainer(model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                          callbacks=callbacks)
    extra = dict(eval_ranks=sorted({1, min(8, args.rank), args.rank}), update_rule="frozen", rank_scaling="per_rank")
    return DynamicRankTrainer(model, args=DynamicRankConfig(**common, **extra), train_dataset=data,
                              eval_dataset=data.select(range(8)), processing_class=tokenizer, callbacks=callbacks)


def run_case(args) -> dict:
    import torch
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    case = args.case

    class Probe(TrainerCallback):
        def __init__(self):
            self.times, self.graphs, self._start = [], [], None

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)
            self.graphs.append(counters["stats"]["unique_graphs"])

    probe = Probe()
    compiled = "inductor" in case or "aot-eager" in case
    result = {"case": case, "recompile_limit_hit": False}
    with tempfile.TemporaryDirectory() as output_dir:
        if case == "slice-aot-eager":
            args.steps = args.slice_ranks
        elif case == "dyn-aot-eager":
            args.steps = args.rank + 1
        trainer = build_trainer(args, case, output_dir, [probe])
        if case in ("slice-aot-eager", "eager-mask"):  # imported here: `eager-slice` also runs on older versions
            from hf_quailora.dynamic_rank.rank_mask import disable_static_rank, enable_static_rank

            (disable_static_rank if case == "slice-aot-eager" else enable_static_rank)(trainer.model)
        if case.endswith("aot-eager"):  # the warm-up step at r, then every rank once (a fixed permutation)
            ranks = iter([args.rank, *torch.randperm(args.rank, generator=torch.Generator().manual_seed(0)).add(1)])
            trainer.rank_sampler.sample = lambda: int(next(ranks))
        start = time.perf_counter()
        trainer.train()
        result["train_s"] = round(time.perf_counter() - start, 1)
        timed = probe.times[args.warm_up:]
        result["step_ms"] = round(1000 * statistics.median(timed), 2) if timed else None
        result["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        result["graphs_after_warm_up"] = probe.graphs[0] if probe.graphs else 0
        if case.endswith("aot-eager") and hasattr(trainer, "evaluate"):
            trainer.evaluate()  # the first evaluation compiles the eval graph: part of the warm-up
            warm = counters["stats"]["unique_graphs"]
            trainer.evaluate()
            result["graphs_after_warm_up"] += warm - probe.graphs[-1]
        result["graphs"] = counters["stats"]["unique_graphs"]
        result["recompiles_after_warm_up"] = result["graphs"] - result["graphs_after_warm_up"]
        result["ranks_drawn"] = len({rank for _, rank in getattr(trainer, "rank_history", [])})
        if compiled:
            from hf_quailora.dynamic_rank.rank_mask import COMPILE_WATCH as _COMPILE_WATCH

            result["recompile_limit_hit"] = "hit config." in _COMPILE_WATCH.warned  # the trainer's own detection
    return result


def table(results: dict, args) -> str:
    rows = ["| case | ranks drawn | graphs | recompiles after warm-up | median step (ms) | vs reference |",
            "|---|---|---|---|---|---|"]
    reference = {"dyn-inductor": "sft-inductor", "eager-mask": "eager-slice", "eager-slice": "sft-eager"}
    for case, result in results.items():
        ratio = ""
        base = results.get(reference.get(case, ""))
        if base and base["step_ms"] and result["step_ms"]:
            ratio = f"{result['step_ms'] / base['step_ms']:.3f}× {reference[case]}"
        step = result["step_ms"] if result["step_ms"] is not None and "aot-eager" not in case else "–"
        limit = " (limit hit: eager)" if result["recompile_limit_hit"] else ""
        rows.append(f"| {case} | {result['ranks_drawn'] or '–'} | {result['graphs']} | "
                    f"{result['recompiles_after_warm_up']}{limit} | {step} | {ratio} |")
    if "eager-slice" in results and "eager-mask" in results:
        a, b = results["eager-slice"]["losses"], results["eager-mask"]["losses"]
        gap = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
        rows.append(f"\nLargest per-step loss difference, eager-slice vs eager-mask: {gap:.2e} over {len(a)} steps.")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = {}
    for case in args.cases:
        command = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--case", case]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        output = subprocess.run(command, capture_output=True, text=True, env=env)
        if output.returncode != 0:
            print(f"{case} failed:\n{output.stderr[-3000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(output.stdout.strip().splitlines()[-1])
        print(json.dumps(results[case]), file=sys.stderr)
    print(f"torch threads: {args.threads}; LoRA r = {args.rank}; {args.steps} steps, the first {args.warm_up} "
          "left out of the timing\n")
    print(table(results, args))


if __name__ == "__main__":
    main()

"""Fine-tuning memory: QLoRA (trl's SFTTrainer) against DynamicRankTrainer after a QuAILoRA start, and the formula.

Two parts:

- `--contract` prints the contract table for real models (their public configs): the NF4 model, the QuAILoRA init's
  peak (`hf_quailora.quailora.memory`), the QLoRA fine-tuning peak (`hf_quailora.quailora.finetune_memory`) and
  whether the init stays under it, with which GPUs each fits. Formula only: no GPU measured these rows.
- Otherwise it measures, on the CPU, one fresh process per case: a synthetic Llama-shaped NF4 checkpoint (random
  weights) with LoRA r on every linear layer trains `--steps` steps of batch × length random tokens with gradient
  checkpointing and AdamW, once with trl's `SFTTrainer` (LoRA's B = 0 start) and once with `DynamicRankTrainer` and
  `QuAILoRAInitCallback` (the init runs at `on_train_begin`). A callback listed after the init resets the process's
  high-water mark there (`echo 5 > /proc/self/clear_refs`, after `malloc_trim`), so the peak counted is training's
  alone: `VmHWM after train − VmRSS at on_train_begin`. As in `bench/bench_init_scaling.py`, each case runs with
  `MALLOC_MMAP_THRESHOLD_=131072` (every tensor of 128 KiB or more is its own mapping, returned when freed), and a
  warm-up step on 8 tokens before the trainer pages in the code that the first backward and step would load. The
  formula's `training_extra` (gradients, optimizer states, activations) is printed beside the measurement.

Usage (the run recorded in bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python bench/bench_finetune_memory.py --threads 1
    python bench/bench_finetune_memory.py --contract
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time


if __package__:
    from ._common import peft_model, status_bytes, write_results
    from .bench_init_scaling import REAL_MODELS, formula_placement
else:
    from _common import peft_model, status_bytes, write_results
    from bench_init_scaling import REAL_MODELS, formula_placement


DEFAULT_SHAPES = "256x768x4x8192,512x1536x8x16384,1024x4096x4x1024"
HEAD_DIM = 64
MMAP_THRESHOLD = 128 * 1024
GPU_SIZES = (24, 48, 80)  # GB (10⁹ bytes)


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """`"256x768x4x8192,…"` → [(hidden, intermediate, layers, vocab), …]."""
    shapes = []
    for item in text.split(",") if text.strip() else []:
        parts = item.strip().split("x")
        if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts) or int(parts[0]) % HEAD_DIM:
            raise ValueError(f"--shapes: {item!r} is not hidden x intermediate x layers x vocab (hidden a multiple "
                             f"of {HEAD_DIM}), e.g. 512x1536x8x16384.")
        shapes.append(tuple(int(part) for part in parts))
    return shapes


FT_VOCAB = 32768  # real models' shapes with one full tile of trl's fused head, not their whole vocabulary


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int):
    from transformers import LlamaConfig

    heads = hidden // HEAD_DIM
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                       tie_word_embeddings=False)


def case_config(case):
    """A shape `(hidden, intermediate, layers, vocab)`, or a name of `REAL_MODELS` (vocabulary cut to `FT_VOCAB`)."""
    from transformers import LlamaConfig

    if isinstance(case, str):
        return LlamaConfig(**{**REAL_MODELS[case], "vocab_size": FT_VOCAB, "tie_word_embeddings": False},
                           max_position_embeddings=4096)
    return llama_config(*case)


def case_label(case) -> str:
    return case if isinstance(case, str) else " / ".join(map(str, case))


def checkpoint(case, device: str = "cpu") -> str:
    """The synthetic checkpoint of `case` (random weights; float32 for the CPU, bf16 built on the GPU for cuda) with
    a three-token tokenizer (the data are token ids: the trainers need its pad and end tokens only), built once."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_quailora.embedded.cache import build_once, get_cache_dir

    def build(folder) -> None:
        torch.manual_seed(0)
        with torch.device(device if device == "cpu" else "cuda"):
            model = LlamaForCausalLM(case_config(case))
        (model if device == "cpu" else model.to(torch.bfloat16)).save_pretrained(folder)
        del model
        words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(folder)

    name = "ft-llama-" + (case if isinstance(case, str) else "x".join(map(str, case)))
    return str(build_once(os.path.join(get_cache_dir(), "bench", name + ("" if device == "cpu" else "-bf16")), build))


def _reset_peak() -> int:
    """Free what can be freed, reset VmHWM, and return the RSS the peak is counted from."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_bytes("VmRSS")


def _warm_up(model, vocab: int) -> None:
    """One forward, backward and AdamW step on 8 tokens: the code the training step needs is paged in here."""
    import torch

    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ids = torch.randint(0, vocab, (1, 8)).to(next(model.parameters()).device)
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], lr=1e-3).step()
    for param in params:
        param.grad = None
    model.gradient_checkpointing_disable()


class _Meter:
    """Peak extra memory from `reset()` on: RSS high-water mark on the CPU, CUDA tensor bytes on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.before = cuda, 0

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _reset_peak()

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        return status_bytes("VmHWM") - self.before


def _trainer_arguments(trainer_kind: str, args) -> dict:
    cuda = args.device == "cuda"
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_finetune_memory-")
    return dict(output_dir=os.path.join(workdir, trainer_kind), max_steps=args.steps,
                per_device_train_batch_size=args.batch_size, learning_rate=1e-4, logging_steps=args.steps,
                save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda, max_length=args.length,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                optim=args.optim, dataloader_num_workers=0, disable_tqdm=True, seed=0)


def run_case(path: str, trainer_kind: str, args) -> dict:
    """One training run in this (fresh) process: its peak extra memory over `on_train_begin` (after the init, whose
    own peak is measured too), and its time."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, QuAILoRAInitCallback
    from hf_quailora.quantization import disable_bnb_cpu_fast_path, make_bnb_config

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=make_bnb_config("nf4", compute_dtype=dtype),
                                                 device_map={"": 0} if cuda else "cpu", dtype=dtype)
    disable_bnb_cpu_fast_path(model)
    vocab = model.config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peft_model(model, rank=args.rank, seed=0)
    _warm_up(model, vocab)
    ids = torch.randint(0, vocab, (args.batch_size * args.steps, args.length), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    meter, marks = _Meter(cuda), {}

    class StartInit(TrainerCallback):
        def on_train_begin(self, *_, **__):
            meter.reset()

    class ResetPeak(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["init_peak"] = meter.peak()
            meter.reset()
            marks["started"] = time.perf_counter()

    callbacks = [StartInit(), ResetPeak()]
    if trainer_kind == "dynamic":
        calibration = torch.randint(0, vocab, (args.calibration_samples, args.calibration_length),
                                    generator=torch.Generator().manual_seed(1))
        callbacks.insert(1, QuAILoRAInitCallback(calibration_dataset=calibration, show_progress=False,
                                                 calibration_samples=args.calibration_samples,
                                                 calibration_length=args.calibration_length, report_file=None,
                                                 solve_device=args.solve_device, gram_device=args.gram_device))
    config = _trainer_arguments(trainer_kind, args)
    if trainer_kind == "dynamic":
        trainer = DynamicRankTrainer(model, args=DynamicRankConfig(**config), train_dataset=data, callbacks=callbacks,
                                     processing_class=tokenizer)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model, args=SFTConfig(**config), train_dataset=data, callbacks=callbacks,
                             processing_class=tokenizer)
    trainer.train()
    result = {"peak_extra": meter.peak(), "seconds": time.perf_counter() - marks["started"]}
    if trainer_kind == "dynamic":
        result["init_peak_extra"] = marks["init_peak"]
    return result


PLACEMENTS = {  # name: (solve_on_cpu, gram_on_cpu), in the order "auto" tries them (quailora/placement.py)
    "all on GPU": (False, False), "solves on CPU": (True, False), "Gram on CPU": (False, True),
    "both on CPU": (True, True),
}


def contract_rows(batch_size: int = 1, length: int = 2048, optimizer: str = "paged_adamw_8bit") -> list[dict]:
    """Per real model: the NF4 model, the init's peak under each placement (QuAILoRA's defaults otherwise), the
    placement `"auto"` picks on a GPU with room (aimed under the fine-tuning step) and the QLoRA fine-tuning peak
    (bf16, r=16 on every linear layer, gradient checkpointing, `optimizer`), in bytes; every peak includes the NF4
    model and the adapter."""
    from types import SimpleNamespace

    from hf_quailora.quailora.finetune_memory import estimate_finetune_memory
    from hf_quailora.quailora.memory import estimate_init_memory
    from hf_quailora.quailora.placement import decide_placement

    rows = []
    for name, config in REAL_MODELS.items():
        config = SimpleNamespace(**config)
        init = estimate_init_memory(config)
        tune = estimate_finetune_memory(config, batch_size=batch_size, max_length=length, optimizer=optimizer)
        loaded = tune.model_4bit + tune.lora_parameters  # what both start from: the NF4 model and its adapter
        auto = decide_placement(init, free=2**50, target=tune.training_extra)
        chosen = next(place for place, where in PLACEMENTS.items() if where == (auto.solve_on_cpu, auto.gram_on_cpu))
        rows.append({"model": name, "nf4": tune.model_4bit, "finetune_peak": tune.peak, "auto": chosen,
                     "auto_peak": loaded + auto.peak,
                     **{place: loaded + init.placed_peak(*where) for place, where in PLACEMENTS.items()}})
    return rows


def contract_table(batch_size: int = 1, length: int = 2048, optimizer: str = "paged_adamw_8bit") -> str:
    """The contract table with fine-tuning (formula only), as Markdown."""
    gib = 2**30
    lines = [
        f"**Formula only** (no GPU has measured these rows; `bench/gpu_check.sh` measures the 1B/3B/8B ones): the init "
        f"with QuAILoRA's defaults (128 × 512 calibration tokens in batches of 8, float32 Gram matrices, float64 "
        f"solves, replay) under each placement of its solves and Gram matrices, and the one `\"auto\"` (the default) "
        f"takes on a GPU with room; QLoRA fine-tuning: NF4 + double quantization, bf16 compute, LoRA r=16 on every "
        f"linear layer (float32 factors), batch {batch_size} × {length} tokens, gradient checkpointing, "
        f"`{optimizer}`, trl's fused LM head (Triton). Every peak includes the NF4 model and the adapter; "
        "GB = 10⁹ bytes.",
        "",
        "| model | NF4 model | init peak: " + " / ".join(PLACEMENTS) + " | `\"auto\"` takes | init peak (auto) | "
        "QLoRA fine-tuning peak | init under it? | " + " | ".join(f"fits {size} GB: init / fine-tuning"
                                                             for size in GPU_SIZES) + " |",
        "|---|---:|---:|---|---:|---:|---|" + "---|" * len(GPU_SIZES),
    ]
    for row in contract_rows(batch_size, length, optimizer):
        fits = [" / ".join("yes" if peak <= size * 1e9 else "no" for peak in (row["auto_peak"], row["finetune_peak"]))
                for size in GPU_SIZES]
        margin = row["finetune_peak"] - row["auto_peak"]
        under = f"yes (−{margin / gib:.2f} GiB)" if margin >= 0 else f"no (+{-margin / gib:.2f} GiB)"
        init = " / ".join(f"{row[place] / gib:.1f}" for place in PLACEMENTS)
        lines.append(f"| {row['model']} | {row['nf4'] / gib:.1f} GiB | {init} GiB | {row['auto']} | "
                     f"{row['auto_peak'] / gib:.2f} GiB | {row['finetune_peak'] / gib:.2f} GiB | {under} | "
                     + " | ".join(fits) + " |")
    return "\n".join(lines)


def formula(case, args) -> dict:
    from hf_quailora.quailora.finetune_memory import estimate_finetune_memory
    from hf_quailora.quailora.memory import estimate_init_memory

    cuda = args.device == "cuda"
    config = case_config(case)
    terms = estimate_finetune_memory(config, batch_size=args.batch_size, max_length=args.length, rank=args.rank,
                                     optimizer=args.optim, activation_bytes=2 if cuda else 4,
                                     lm_head="fused_triton" if cuda else "fused_torch")
    init = estimate_init_memory(config, num_samples=args.calibration_samples, max_length=args.calibration_length,
                                activation_bytes=2 if cuda else 4, rank=args.rank)
    # on the CPU every placement is the same memory; on a GPU the placement decides what stays there
    init_peak = init.placed_peak(*formula_placement(init, config, args)) if cuda else init.streamed_peak
    return {"formula": terms.training_extra, "init_formula": init_peak, "checkpoints": terms.checkpoints,
            "block": terms.block_recompute, "lm_head": terms.lm_head, "lora": terms.lora_parameters}


def measure(args) -> list[dict]:
    rows, started = [], time.monotonic()
    cases = [*parse_shapes(args.shapes), *[name for name in args.models.split(",") if name]]
    for case in cases:
        if args.time_limit and time.monotonic() - started > args.time_limit:
            print(f"{case_label(case)}: skipped, --time-limit {args.time_limit:.0f} s reached", flush=True)
            continue
        path = checkpoint(case, args.device)
        expected = formula(case, args)
        for kind in ("sft", "dynamic"):
            command = [sys.executable, os.path.abspath(__file__), "--case", path, kind, *sys.argv[1:]]
            env = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
            output = subprocess.run(command, capture_output=True, text=True, env=env)
            if output.returncode:
                raise RuntimeError(f"case {case_label(case)} {kind} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            rows.append({"case": case, "trainer": kind, **result, **expected})
            print(f"{case_label(case)} {kind}: {result['peak_extra'] / 2**20:.0f} MiB (formula "
                  f"{expected['formula'] / 2**20:.0f} MiB), {result['seconds']:.1f} s", flush=True)
    return rows


def to_markdown(rows: list[dict], args) -> str:
    mib = 2**20
    cuda = args.device == "cuda"
    sft = {case_label(row["case"]): row["peak_extra"] for row in rows if row["trainer"] == "sft"}
    where = ("bf16 compute on the GPU; peak = CUDA tensor bytes (max_memory_allocated − memory_allocated at "
             "on_train_begin)" if cuda else "float32 compute on the CPU; peak = VmHWM − VmRSS at on_train_begin")
    lines = [
        f"Llama-shaped NF4 checkpoints (random weights, GQA), LoRA r={args.rank} on all linear layers, {args.steps} "
        f"steps of {args.batch_size} × {args.length} tokens, gradient checkpointing, `{args.optim}`; {where} (after "
        f"the init: the init's own peak beside it, {args.calibration_samples} × {args.calibration_length} calibration "
        f"tokens, solve_device={args.solve_device}, gram_device={args.gram_device}); a fresh process per case; torch "
        f"threads {args.threads}. Formula: `estimate_finetune_memory(...).training_extra`.",
        "",
        "| hidden / intermediate / layers / vocab | trainer | peak extra (measured) | formula | measured / formula "
        "| / SFTTrainer | init peak extra (measured / formula) | wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = "SFTTrainer (QLoRA, B = 0)" if row["trainer"] == "sft" else "DynamicRankTrainer + QuAILoRA start"
        init = ("{:,.0f} / {:,.0f} MiB".format(row["init_peak_extra"] / mib, row["init_formula"] / mib)
                if "init_peak_extra" in row else "–")
        lines.append("| {} | {} | {:,.0f} MiB | {:,.0f} MiB | {:.2f} | {:.3f} | {} | {:.1f} |".format(
            case_label(row["case"]), label, row["peak_extra"] / mib, row["formula"] / mib,
            row["peak_extra"] / row["formula"], row["peak_extra"] / sft[case_label(row["case"])], init,
            row["seconds"]))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="hidden x intermediate x layers x vocab, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="", help="real models' shapes (vocabulary cut to 32768), comma-separated")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds: later cases are skipped (0: no limit)")
    parser.add_argument("--optim", default="adamw_torch", help="the Trainer's optimizer (paged_adamw_8bit on a GPU)")
    parser.add_argument("--calibration-samples", type=int, default=2)
    parser.add_argument("--calibration-length", type=int, default=64)
    parser.add_argument("--solve-device", choices=("auto", "model", "cpu"), default="auto")
    parser.add_argument("--gram-device", choices=("auto", "model", "cpu"), default="auto")
    parser.add_argument("--workdir", default=None, help="the trainers' output_dir (default: a temporary folder)")
    parser.add_argument("--output", default="bench/results/finetune_memory", help="writes .md and .json")
    parser.add_argument("--contract", action="store_true", help="print the formula's table for real models and stop")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "TRAINER"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = make_parser().parse_args()
    if args.contract:
        print(contract_table())
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args)))
        return
    rows = measure(args)
    if not rows:
        raise ValueError("Nothing measured: give --shapes, --models, or a longer --time-limit.")
    table = to_markdown(rows, args)
    write_results(args.output, table + "\n", {"settings": vars(args), "rows": rows})
    print("\n" + table)


if __name__ == "__main__":
    main()

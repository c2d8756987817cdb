"""QDyLoRA + QuAILoRA fine-tuning on Alpaca: one run, every rank, from a calibrated start.

With no arguments it runs a short but real fine-tune of the embedded SmolLM2-135M-Instruct (NF4) on the embedded
Alpaca data, on a CPU, in a few minutes:

    accelerate launch recipes/alpaca.py
    python recipes/alpaca.py                                              # the same, one process
    accelerate launch recipes/alpaca.py --config recipes/configs/alpaca_gpu.yaml      # 7B-class QLoRA on a GPU
    accelerate launch --num_processes 4 recipes/alpaca.py --config recipes/configs/alpaca_multi_gpu.yaml
    torchrun --nproc_per_node 2 recipes/alpaca.py --max_steps 10 --ddp_backend gloo  # two processes on a CPU

Steps: (1) load the data (Alpaca, its hold-out, the calibration text); (2) load the base quantized by bitsandbytes
and wrap it in a LoRA of rank `lora_r`; (3) QuAILoRA initialises the factors from calibration text
(`QuAILoRAInitCallback`), and `DynamicRankTrainer` trains with a rank drawn every optimizer step and reports the
eval loss at every `eval_ranks` rank; (4) the adapter is saved, a final lm-eval sweep over ranks runs, and requested
ranks are exported as ordinary peft adapters. Every setting is checked before the model loads. The output folder
holds `adapter/`, `adapter-r{b}/` (on request), `results.md|json|png` and `summary.json`.

Every option: `python recipes/alpaca.py --help` (the script's own options, every `DynamicRankConfig` /
`SFTConfig` / `TrainingArguments` option, and `--config FILE.yaml`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, get_peft_model
from trl import TrlParser

from hf_quailora import (
    DynamicRankConfig,
    DynamicRankTrainer,
    QuAILoRAConfig,
    QuAILoRAInitCallback,
    export_rank,
    load_alpaca_sft,
    load_dataset_any,
    load_quantized_model,
    quiet_bnb_warnings,
)
from hf_quailora._io_utils import check_not_a_file, write_file_atomically
from hf_quailora.dynamic_rank.spec import check_rank_settings, check_ranks, parse_ranks
from hf_quailora.embedded.data import ALPACA_HOLDOUT, split_holdout
from hf_quailora.quailora.config import GRAM_DEVICES, SOLVERS
from hf_quailora.quantization import QUANTIZATIONS


logger = logging.getLogger("recipes.alpaca")


@dataclass
class AlpacaScriptArguments:
    """Model, LoRA, data, QuAILoRA and sweep settings of the Alpaca recipe (training settings: DynamicRankConfig)."""

    # Model and quantization
    model_name_or_path: str = field(default="smollm2-135m", metadata={"help": "Embedded name, folder or Hub id."})
    quantization: str = field(
        default="nf4", metadata={"help": "Base quantization.", "choices": list(QUANTIZATIONS)}
    )
    double_quant: bool = field(default=True, metadata={"help": "Double quantization of 4-bit statistics."})
    # LoRA
    lora_r: int = field(default=16, metadata={"help": "Maximum LoRA rank (every rank up to it is trained)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules (comma-separated)."})
    # Data
    dataset_name: str = field(default="alpaca", metadata={"help": "Embedded 'alpaca', a local JSON, or a Hub id."})
    eval_holdout: int = field(default=ALPACA_HOLDOUT, metadata={"help": "Last examples held out from training."})
    num_eval_examples: int = field(default=32, metadata={"help": "Held-out examples used by evaluate()."})
    num_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    # QuAILoRA
    quailora: bool = field(default=True, metadata={"help": "Initialise LoRA with QuAILoRA (False: B = 0, QLoRA)."})
    calibration_dataset: str = field(default="c4", metadata={"help": "Calibration text (embedded name, file, Hub)."})
    calibration_samples: int = field(default=32, metadata={"help": "Calibration sequences."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    quailora_solver: str = field(
        default="closed_form", metadata={"help": "QuAILoRA solver.", "choices": list(SOLVERS)}
    )
    quailora_damping: float = field(default=1e-4, metadata={"help": "Relative damping of the Gram matrices."})
    quailora_memory_budget: str = field(
        default="auto", metadata={"help": "Bytes of Gram matrices alive at once ('auto': one block at a time)."}
    )
    quailora_gram_device: str = field(
        default="model", metadata={"help": "Where Gram matrices accumulate.", "choices": list(GRAM_DEVICES)}
    )
    # Final rank sweep and export
    sweep_tasks: str = field(default="quailora_wiki_ppl", metadata={"help": "lm-eval tasks of the final sweep ('' = skip)."})
    sweep_ranks: str | None = field(default=None, metadata={"help": "Ranks of the final sweep (default: eval_ranks)."})
    sweep_limit: int | None = field(default=16, metadata={"help": "Documents per task in the final sweep."})
    export_ranks: str | None = field(default=None, metadata={"help": "Ranks to export as plain peft adapters, e.g. 4,16."})


def _ranks(text: str | None, default: list[int]) -> list[int]:
    return parse_ranks(text) if text else list(default)


def _quailora_config(script_args: AlpacaScriptArguments) -> QuAILoRAConfig:
    return QuAILoRAConfig(
        num_samples=script_args.calibration_samples, max_length=script_args.calibration_length,
        solver=script_args.quailora_solver, damping=script_args.quailora_damping,
        memory_budget=script_args.quailora_memory_budget, gram_device=script_args.quailora_gram_device,
    )


def _check(script_args: AlpacaScriptArguments, training_args: DynamicRankConfig) -> None:
    """Fail on bad settings before anything is loaded."""
    if script_args.lora_r < 1:
        raise ValueError(f"`lora_r` ({script_args.lora_r}) must be at least 1.")
    max_rank = check_rank_settings(training_args, script_args.lora_r)  # eval/SoFT/choice ranks too
    check_not_a_file(training_args.output_dir)
    if script_args.num_train_examples is not None and script_args.num_train_examples < 1:
        raise ValueError(f"`num_train_examples` ({script_args.num_train_examples}) must be at least 1 (or unset).")
    for name in ("sweep_ranks", "export_ranks"):  # only trained ranks can be evaluated or exported
        check_ranks(_ranks(getattr(script_args, name), []), 1, max_rank, name, "the trained range (up to max_rank)")
    if script_args.num_eval_examples < 1 or script_args.eval_holdout < script_args.num_eval_examples:
        raise ValueError(
            f"`num_eval_examples` ({script_args.num_eval_examples}) must be between 1 and `eval_holdout` "
            f"({script_args.eval_holdout})."
        )
    if script_args.quailora and script_args.quantization == "none":
        raise ValueError("QuAILoRA corrects a quantization error: use a quantized base or `--quailora false`.")
    if script_args.quailora:
        _quailora_config(script_args)  # its own checks (solver, budget, placement), before any loading
    if script_args.sweep_tasks:
        from hf_quailora.evaluation.lm_eval_bridge import check_lm_eval_options, resolve_tasks

        check_lm_eval_options(limit=script_args.sweep_limit)
        resolve_tasks(script_args.sweep_tasks)


def _load_model(script_args: AlpacaScriptArguments):
    """Step 2: the quantized base wrapped in a LoRA of the maximum rank."""
    model, tokenizer = load_quantized_model(
        script_args.model_name_or_path, script_args.quantization, double_quant=script_args.double_quant
    )
    targets = script_args.lora_target_modules
    model = get_peft_model(model, LoraConfig(
        r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","), task_type="CAUSAL_LM",
    ))
    return model, tokenizer


def _load_data(script_args: AlpacaScriptArguments):
    """Step 1: Alpaca as prompt/completion (loss on the response only), the last examples held out; the
    calibration text. Loaded before the model, so that a wrong name or size fails in seconds."""
    train, held_out = split_holdout(load_alpaca_sft(script_args.dataset_name), script_args.eval_holdout)
    if script_args.num_train_examples is not None:
        train = train.select(range(min(len(train), script_args.num_train_examples)))
    calibration = load_dataset_any(script_args.calibration_dataset) if script_args.quailora else None
    return train, held_out.select(range(script_args.num_eval_examples)), calibration


def _train(script_args, training_args, model, tokenizer, data):
    """Step 3: QuAILoRA start, then dynamic-rank training; returns the trainer and the start/end evaluations."""
    train, evaluation, calibration = data
    callbacks = []
    if script_args.quailora:
        callbacks.append(QuAILoRAInitCallback(calibration_dataset=calibration, config=_quailora_config(script_args)))
    trainer = DynamicRankTrainer(model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer, callbacks=callbacks)
    initial = None
    if not training_args.eval_on_start:  # before training, and before QuAILoRA (it runs at train begin)
        initial = trainer.evaluate()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.eval_on_start:  # evaluated right after on_train_begin, i.e. at the QuAILoRA start
        initial = next((e for e in trainer.state.log_history if "eval_loss" in e), None)
    return trainer, initial, trainer.evaluate()


def _loss_rows(trainer, evaluations: dict) -> list[dict]:
    """The held-out Alpaca loss of each evaluation at every eval rank, as result rows."""
    rows = []
    for label, metrics in evaluations.items():
        for b in trainer.eval_ranks if metrics else []:
            loss = metrics.get(f"eval_loss@r{b}")
            if loss is not None:
                rows.append({"model": label, "rank": b, "task": "alpaca held-out", "metric": "eval_loss",
                             "value": loss, "stderr": None})
    return rows


def _print_summary(summary: dict, rows: list[dict], trainer) -> None:
    from hf_quailora.evaluation.reporting import rows_to_markdown

    paths, initial, final = summary["results"], summary["initial_metrics"], summary["final_metrics"]
    print("\n" + rows_to_markdown(rows))
    print(f"Done in {summary['seconds']:.0f} s. Written to {summary['output_dir']}:")
    print(f"  adapter (full rank {trainer.max_rank}): {summary['adapter']}")
    for b, path in summary["exported"].items():
        print(f"  rank {b} as a plain peft adapter: {path}")
    print(f"  results: {paths['markdown']}, {paths['json']}, {paths['plot']}")
    print(f"  summary: {os.path.join(summary['output_dir'], 'summary.json')}")
    if initial and final:
        for b in trainer.eval_ranks:
            before, after = initial.get(f"eval_loss@r{b}"), final.get(f"eval_loss@r{b}")
            if before is not None and after is not None:
                print(f"  rank {b:>3}: eval loss {before:.4f} → {after:.4f} (ppl {math.exp(after):.2f})")


def _sweep_and_export(script_args, training_args, trainer, tokenizer, initial, final, summary, started) -> None:
    """Step 4 (main process): per-rank tables, the lm-eval sweep, exports, `summary.json`."""
    from hf_quailora.evaluation.reporting import write_rank_report

    start_label = "start" if training_args.eval_on_start or not script_args.quailora else "before QuAILoRA"
    rows = _loss_rows(trainer, {start_label: initial, "after training": final})
    if script_args.sweep_tasks:
        from hf_quailora.evaluation.lm_eval_bridge import evaluate_ranks

        rows += evaluate_ranks(
            trainer.model, tokenizer, _ranks(script_args.sweep_ranks, trainer.eval_ranks), script_args.sweep_tasks,
            limit=script_args.sweep_limit, rank_scaling=training_args.rank_scaling,
            baselines={"base model (no adapter)": "no_adapter"}, label="after training",
        )
    paths = write_rank_report(rows, training_args.output_dir,
                              title=f"{script_args.model_name_or_path} ({script_args.quantization}) on Alpaca")
    exported = {
        b: export_rank(trainer.model, b, os.path.join(training_args.output_dir, f"adapter-r{b}"),
                       rank_scaling=training_args.rank_scaling)
        for b in _ranks(script_args.export_ranks, [])
    }
    summary.update({"initial_metrics": initial, "final_metrics": final, "results": paths, "exported": exported,
                    "seconds": time.perf_counter() - started})
    text = json.dumps(summary, indent=1, default=str)
    write_file_atomically(os.path.join(training_args.output_dir, "summary.json"),
                          lambda tmp: Path(tmp).write_text(text))
    _print_summary(summary, rows, trainer)


def main(script_args: AlpacaScriptArguments, training_args: DynamicRankConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_bnb_warnings()
    _check(script_args, training_args)
    started = time.perf_counter()
    data = _load_data(script_args)  # 1.
    model, tokenizer = _load_model(script_args)  # 2.
    trainer, initial, final = _train(script_args, training_args, model, tokenizer, data)  # 3.
    adapter_dir = os.path.join(training_args.output_dir, "adapter")  # 4. save, sweep, export
    trainer.save_model(adapter_dir)
    summary: dict = {"output_dir": training_args.output_dir, "adapter": adapter_dir, "eval_ranks": trainer.eval_ranks}
    if trainer.is_world_process_zero():
        _sweep_and_export(script_args, training_args, trainer, tokenizer, initial, final, summary, started)
    return summary


def make_parser() -> TrlParser:
    return TrlParser((AlpacaScriptArguments, DynamicRankConfig))


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "alpaca.yaml")


def parse_args_and_config(parser: TrlParser | None = None, args: list[str] | None = None):
    """Parse `--config FILE.yaml` plus command-line overrides; without `--config`, the CPU demo config is used."""
    parser = parser or make_parser()
    args = list(args if args is not None else sys.argv[1:])
    if "--config" not in args and not any(a in ("-h", "--help") for a in args):
        args = ["--config", DEFAULT_CONFIG, *args]
    return parser.parse_args_and_config(args=args)


if __name__ == "__main__":
    script_args, training_args = parse_args_and_config()
    main(script_args, training_args)

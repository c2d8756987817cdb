"""QuAILoRA initialisation of a quantized model, with a per-layer report and held-out perplexity before/after.

The main job until the full Alpaca fine-tuning recipe lands. On a CPU, with the embedded defaults
(SmolLM2-135M-Instruct in NF4, C4 calibration text, held-out Wikipedia windows) it takes a few minutes:

    python recipes/quailora_init.py --num_samples 32 --max_length 256      # ~2 min
    python recipes/quailora_init.py --rank 64 --solver als                 # 128 calibration windows of 512 tokens
    python recipes/quailora_init.py --model_name_or_path meta-llama/Llama-3.1-8B --quantization nf4  # with the Hub

Every option: `python recipes/quailora_init.py --help`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser

from hf_quailora import (
    QuAILoRAConfig,
    compute_perplexity,
    load_dataset_any,
    load_quantized_model,
    make_token_windows,
    quailora_init,
    quiet_bnb_warnings,
)
from hf_quailora._io_utils import write_file_atomically
from hf_quailora.quantization import BNB_QUANTIZATIONS


@dataclass
class InitScriptArguments:
    """Model, LoRA and data settings of the QuAILoRA initialisation recipe."""

    model_name_or_path: str = field(default="smollm2-135m", metadata={"help": "Embedded name, folder or Hub id."})
    quantization: str = field(
        default="nf4", metadata={"help": "Base quantization.", "choices": list(BNB_QUANTIZATIONS)}
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to the rank)."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling alpha/sqrt(r)."})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules (comma-separated)."})
    calibration_data: str = field(default="c4", metadata={"help": "Calibration text: embedded name, file or Hub id."})
    eval_data: str = field(default="wiki", metadata={"help": "Held-out text for perplexity."})
    eval_windows: int = field(default=16, metadata={"help": "Held-out windows for perplexity (0: skip)."})
    window_length: int = field(default=256, metadata={"help": "Tokens per held-out eval window."})
    output_dir: str = field(default="outputs/quailora_init", metadata={"help": "Where the report is written."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)."})


def main(script_args: InitScriptArguments, quailora_args: QuAILoRAConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_bnb_warnings()
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    if script_args.rank < 1:
        raise ValueError(f"`--rank` ({script_args.rank}) must be at least 1.")
    model, tokenizer = load_quantized_model(script_args.model_name_or_path, script_args.quantization)
    targets = script_args.target_modules
    lora = LoraConfig(
        r=script_args.rank,
        lora_alpha=script_args.lora_alpha or script_args.rank,
        use_rslora=script_args.use_rslora,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        lora_dropout=0.0,
    )
    model = get_peft_model(model, lora)
    calibration = make_token_windows(
        tokenizer,
        load_dataset_any(script_args.calibration_data)["text"],
        quailora_args.max_length,
        quailora_args.num_samples,
    )
    results: dict = {"model": script_args.model_name_or_path, "quantization": script_args.quantization,
                     "rank": script_args.rank, "solver": quailora_args.solver}
    windows = None
    if script_args.eval_windows > 0:
        windows = make_token_windows(
            tokenizer, load_dataset_any(script_args.eval_data)["text"], script_args.window_length,
            script_args.eval_windows,
        )
        with model.disable_adapter():
            results["perplexity_qlora_start"] = compute_perplexity(model, windows, show_progress=True)
    started = time.perf_counter()
    report = quailora_init(model, calibration, quailora_args, tokenizer=tokenizer)
    results["init_seconds"] = time.perf_counter() - started
    if windows is not None:
        results["perplexity_quailora_start"] = compute_perplexity(model, windows, show_progress=True)

    print("\n" + report.to_markdown(max_rows=14) + "\n")
    print(report.summary())
    if windows is not None:
        print(
            f"Held-out perplexity ({script_args.eval_data}, {windows.shape[0]}×{windows.shape[1]} tokens): "
            f"QLoRA start (B = 0) {results['perplexity_qlora_start']:.3f} → QuAILoRA start "
            f"{results['perplexity_quailora_start']:.3f}"
        )
    os.makedirs(script_args.output_dir, exist_ok=True)
    text = json.dumps({**results, "report": report.to_dict()}, indent=1)
    write_file_atomically(os.path.join(script_args.output_dir, "quailora_report.json"),
                          lambda tmp: Path(tmp).write_text(text))
    markdown = report.to_markdown() + "\n"
    write_file_atomically(os.path.join(script_args.output_dir, "quailora_report.md"),
                          lambda tmp: Path(tmp).write_text(markdown))
    print(f"Report written to {script_args.output_dir}/quailora_report.json and quailora_report.md")
    return results


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((InitScriptArguments, QuAILoRAConfig))


if __name__ == "__main__":
    script_args, quailora_args = make_parser().parse_args_into_dataclasses()
    main(script_args, quailora_args)

"""QuAILoRA initialisation of a quantized model, with a per-layer report and held-out perplexity before/after.

The same model, LoRA and QuAILoRA flags as `recipes/alpaca.py` (trl's `ModelConfig` names, `QuAILoRAConfig`'s
field names, and the shared `RecipeArguments`). On a CPU, with the defaults (SmolLM2-135M-Instruct in NF4, LoRA
r = 16 on all linear layers, 32 C4 calibration windows of 256 tokens, held-out Wikipedia windows) it takes a few
minutes. It writes a report and, in `output_dir/adapter`, the initialised adapter (the folder `hf-quailora init`
writes; `--save_adapter false` skips it):

    python recipes/quailora_init.py
    python recipes/quailora_init.py --lora_r 64 --solver als --calibration_samples 128 --calibration_length 512
    python recipes/quailora_init.py --load_in_8bit --lora_target_modules q_proj v_proj     # LLM.int8, two modules
    python recipes/quailora_init.py --model_name_or_path meta-llama/Llama-3.1-8B --load_in_4bit  # with the Hub

Every option: `python recipes/quailora_init.py --help`. This recipe's former flags (`--rank`, `--target_modules`,
`--calibration_data`, `--num_samples`, `--max_length`, `--batch_size`, `--quailora_solver`, ...) still work, with a
FutureWarning (`LEGACY_FLAGS`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_quailora import compute_perplexity, load_dataset_any, make_token_windows, quailora_init, quiet_bnb_warnings
from hf_quailora._io_utils import write_file_atomically
from hf_quailora.quailora.config import RENAMED_OPTIONS
from hf_quailora.scripts import (
    RENAMED_FLAGS,
    RecipeArguments,
    RecipeModelConfig,
    RecipeParser,
    RecipeQuAILoRAConfig,
    check_recipe_arguments,
    load_recipe_model,
)
from hf_quailora.scripts.calibration import calibration_source
from hf_quailora.scripts.init_adapter import calibration_record, save_quailora_start
from hf_quailora.tokens import tokenizer_adds_bos


# This recipe's former flags, still accepted with a FutureWarning: its own names before it took trl's, the
# QuAILoRAConfig fields' former names, and the recipes' former `--quailora_*` flags
LEGACY_FLAGS = {"rank": "lora_r", "target_modules": "lora_target_modules", "calibration_data": "calibration_dataset",
                **RENAMED_OPTIONS, **RENAMED_FLAGS}


@dataclass
class InitScriptArguments:
    """This recipe's own settings: the held-out perplexity, the output folder, threads."""

    eval_data: str = field(default="wiki", metadata={"help": "Held-out text for perplexity."})
    eval_windows: int = field(default=16, metadata={"help": "Held-out windows for perplexity (0: skip)."})
    window_length: int = field(default=256, metadata={"help": "Tokens per held-out eval window."})
    output_dir: str = field(default="outputs/quailora_init", metadata={"help": "Where the report is written."})
    save_adapter: bool = field(
        default=True, metadata={"help": "Also write the initialised adapter to output_dir/adapter, as `hf-quailora "
                                        "init` does (train it from there with any launcher)."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code from the Hub."})


def _print_and_write(script_args: InitScriptArguments, results: dict, report, windows) -> None:
    """The per-layer table, the perplexities, and `quailora_report.json|md` in `output_dir`."""
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


def main(script_args: InitScriptArguments, model_args: RecipeModelConfig, recipe_args: RecipeArguments,
         quailora_args: RecipeQuAILoRAConfig) -> dict:
    """Run the recipe; the arguments are what `make_parser().parse_args_and_config()` returns."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_bnb_warnings()
    check_recipe_arguments(model_args, recipe_args, trains=False)
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    source = calibration_source(recipe_args.calibration_dataset, trains=False)  # "auto": C4 (no training data)
    calibration_text = load_dataset_any(source)["text"]  # before the model: fails fast
    eval_text = load_dataset_any(script_args.eval_data)["text"] if script_args.eval_windows > 0 else None
    model, tokenizer = load_recipe_model(model_args, trust_remote_code=script_args.trust_remote_code)
    calibration = make_token_windows(tokenizer, calibration_text, quailora_args.calibration_length,
                                     quailora_args.calibration_samples, add_bos=tokenizer_adds_bos(tokenizer))
    results: dict = {"model": model_args.model_name_or_path, "quantization": model_args.quantization,
                     "rank": model_args.lora_r, "solver": quailora_args.solver}
    windows = None
    if eval_text is not None:
        windows = make_token_windows(tokenizer, eval_text, script_args.window_length, script_args.eval_windows,
                                     add_bos=tokenizer_adds_bos(tokenizer))
        with model.disable_adapter():
            results["perplexity_qlora_start"] = compute_perplexity(model, windows, show_progress=True)
    started = time.perf_counter()
    report = quailora_init(model, calibration, quailora_args, tokenizer=tokenizer)
    results["init_seconds"] = time.perf_counter() - started
    if windows is not None:
        results["perplexity_quailora_start"] = compute_perplexity(model, windows, show_progress=True)

    _print_and_write(script_args, results, report, windows)
    if script_args.save_adapter:
        calibration = calibration_record(source, quailora_args, report,
                                         int(calibration.shape[0]))
        path = save_quailora_start(model, os.path.join(script_args.output_dir, "adapter"), calibration, report)
        print(f"Initialised adapter written to {path} (hf-quailora init writes the same folder)")
    return results


def make_parser() -> RecipeParser:
    """This recipe's settings, trl's model arguments, the shared recipe options and the QuAILoRA settings
    (`--config FILE.yaml` works); the former flags of `LEGACY_FLAGS` are renamed with a FutureWarning."""
    return RecipeParser((InitScriptArguments, RecipeModelConfig, RecipeArguments, RecipeQuAILoRAConfig),
                        renamed_flags=LEGACY_FLAGS)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())

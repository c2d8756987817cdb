"""Fine-tuning comparison of LoRA starts on a quantized base: the QuAILoRA paper's experiment at our scale.

Every arm fine-tunes the same model on the same Alpaca examples, in the same order, for the same number of steps,
with the same LoRA (rank r, `lora_alpha = r`, all linear layers) and the same random A; only the base and the
starting values of the adapter differ:

| arm        | base      | adapter start                                                   |
|------------|-----------|-----------------------------------------------------------------|
| `qlora`    | NF4       | B = 0 (QLoRA)                                                   |
| `svd`      | NF4       | truncated SVD of E = W − Q, uncalibrated (LoftQ-style, Q fixed) |
| `quailora` | NF4       | QuAILoRA, calibrated closed form on C4 windows                  |
| `int8`     | LLM.int8  | B = 0                                                           |
| `fp32`     | none      | B = 0                                                           |
| `dynamic`  | NF4       | QuAILoRA, trained by `DynamicRankTrainer` (constant scaling)    |

Reported at the start and after fine-tuning (and every `--eval_steps` for the convergence plot): held-out
Wikipedia perplexity and the loss on held-out Alpaca responses (the last `--eval_examples` examples, never
trained on). "gap closed" is the fraction of the NF4 → int8 perplexity gap an arm closes,
`(ppl_qlora − ppl_arm) / (ppl_qlora − ppl_int8)` (the paper's headline: 75% on average, after fine-tuning).
The dynamic arm also reports per-rank perplexity and Alpaca loss at `--dynamic_eval_ranks`.

Launch from the repository root (CPU; see the README for a timed run on the embedded SmolLM2-135M):

    python -m bench.compare_init --threads 1
    python -m bench.compare_init --arms qlora,quailora,int8 --steps 40 --rank 16 --eval_windows 16
    python -m bench.compare_init --model_name_or_path meta-llama/Llama-3.1-8B --steps 500  # with the Hub and a GPU

Outputs in `--output_dir`: `results.md` (table), `results.json` (everything, curves included) and
`convergence.png`. Every option: `python -m bench.compare_init --help`. A past run: `bench/results/compare_init/`.

Modules: `arms` (the arms, `CompareScriptArguments` and their checks), `run` (data and one arm's run), `report`
(table, gap closed, convergence plot) and this entry point (`main`, `make_parser`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict

import torch
from transformers import AutoTokenizer, HfArgumentParser

from hf_quailora import load_dataset_any, make_token_windows, resolve

from .arms import ARMS, CompareScriptArguments, check_arguments, parse_dynamic_eval_ranks
from .report import plot_convergence, to_markdown
from .run import load_alpaca_split, run_arm


logger = logging.getLogger(__name__)


def main(args: CompareScriptArguments) -> list[dict]:
    """Run every arm of `args.arms` and write `results.md`, `results.json` and `convergence.png` to `--output_dir`.

    Args:
        args: the parsed settings (`make_parser().parse_args_into_dataclasses()`).

    Returns:
        The results of every arm, in the order of `--arms` (as in `results.json`).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arms = check_arguments(args)
    dynamic_ranks = parse_dynamic_eval_ranks(args.dynamic_eval_ranks, args.rank) if "dynamic" in arms else None
    torch.set_num_threads(args.threads)

    # 1. Data, identical for every arm, checked before any training
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out, train_examples = load_alpaca_split(args)  # the library's hold-out (split_holdout)
    windows = make_token_windows(tokenizer, load_dataset_any(args.perplexity_data)["text"], args.window_length,
                                 args.eval_windows)
    calibration = None
    if any(ARMS[arm][1] == "closed_form" for arm in arms):
        calibration = make_token_windows(tokenizer, load_dataset_any(args.calibration_data)["text"],
                                         args.window_length, args.calibration_windows)

    # 2. The arms, one after another, freeing each model before the next
    results = []
    for arm in arms:
        logger.info("=== arm %s ===", arm)
        results.append(run_arm(arm, args, tokenizer, train, held_out, windows, calibration, dynamic_ranks))

    # 3. Report
    meta = {**asdict(args), "model": args.model_name_or_path, "train_examples": train_examples,
            "eval_windows": int(windows.shape[0]), "torch": torch.__version__, "platform": platform.machine()}
    os.makedirs(args.output_dir, exist_ok=True)
    table = to_markdown(results, meta)
    paths = {name: os.path.join(args.output_dir, name) for name in ("results.md", "results.json", "convergence.png")}
    with open(paths["results.md"], "w") as handle:
        handle.write(table)
    with open(paths["results.json"], "w") as handle:
        json.dump({"settings": meta, "arms": results}, handle, indent=1)
    plot_convergence(results, paths["convergence.png"])
    print("\n" + table)
    print("Wrote " + ", ".join(paths.values()))
    return results


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(CompareScriptArguments, prog="python -m bench.compare_init")


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_into_dataclasses()
    main(script_args)

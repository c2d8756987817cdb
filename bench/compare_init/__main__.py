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
The dynamic arm also reports per-rank perplexity and Alpaca loss at `--dynamic_eval_ranks`. `--cloze_examples N`
adds the `quailora_wiki_cloze` accuracy (lm-eval, offline) at the start and the end, and its gap closed;
`--quailora_lr_scale` runs the `quailora` arm once per learning-rate scale (arms `quailora@lr<scale>`), and
`--calibration_data alpaca_train` calibrates on the training examples instead of C4.

Launch from the repository root (CPU; see the README for a timed run on the embedded SmolLM2-135M):

    python -m bench.compare_init --threads 1
    python -m bench.compare_init --arms qlora,quailora,int8 --steps 40 --rank 16 --eval_windows 16
    python -m bench.compare_init --arms qlora,quailora,int8 --models smollm2-135m,gemma3-270m --ranks 16,64 \
        --seeds 1,2,3 --output_dir outputs/compare_paper        # run again to resume; finished arms are skipped
    python -m bench.compare_init --summary_only --output_dir outputs/compare_paper    # summarise what finished
    python -m bench.compare_init --arms qlora,quailora,int8 --quailora_lr_scale 1,0.5,0.25 \
        --calibration_data alpaca_train --cloze_examples 100   # QuAILoRA at 3 learning rates, calibrated on the task
    python -m bench.compare_init --model_name_or_path meta-llama/Llama-3.1-8B --steps 500  # with the Hub and a GPU

Outputs in `--output_dir`: one JSON per finished arm, `runs/<model>/r<rank>/seed<seed>/<arm>.json` (written
atomically; a later run with the same settings skips it, so an interrupted run resumes per arm; QLoRA and int8 arms,
which do not calibrate, may come from a run that differed only in `--calibration_data` / `--calibration_windows`:
copy their JSONs into a new folder and run only the QuAILoRA arms there), and the summary of
every finished arm: `results.md` (per model and rank, mean ± std over seeds of perplexity, Alpaca loss and gap
closed at the start and the end), `results.json` (every arm, curves included, and the summary) and
`convergence.png` (curves per model and rank, mean over seeds with a ± std band). Every option:
`python -m bench.compare_init --help`. A past run: `bench/results/compare_init/`.

Modules: `arms` (the arms, `CompareScriptArguments` and their checks), `run` (data and one arm's run), `store`
(finished arms on disk), `summary` (gap closed per seed, mean ± std over seeds, bands plot) and this entry point
(`main`, `make_parser`).
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
from dataclasses import replace

import torch
from transformers import AutoTokenizer, HfArgumentParser

from hf_quailora import resolve

from .._common import write_json, write_results
from .arms import ARMS, CompareScriptArguments, RunPlan, base_arm, check_arguments, needs_bos
from .decomposition import decompose, decomposition_markdown
from .run import load_alpaca_split, run_arm, token_windows
from .store import (
    arm_path,
    check_compatible,
    load_finished,
    model_slug,
    reference_settings,
    resume_settings,
    start_path,
)
from .summary import plot_summary, summarize, summary_markdown


logger = logging.getLogger(__name__)


def load_model_data(args: CompareScriptArguments, model: str, calibrate: bool):
    """The tokenizer, Alpaca split, held-out windows and (if `calibrate`) the calibration windows of one model (of
    `--calibration_data`: `run.calibration_texts`, never the held-out windows: `run.token_windows`); BOS starts
    every window of models that need it."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out, train_examples = load_alpaca_split(args)  # the library's hold-out (split_holdout)
    windows, calibration = token_windows(args, tokenizer, train, needs_bos(model), calibrate)
    return tokenizer, train, held_out, train_examples, windows, calibration


def run_model(args: CompareScriptArguments, plan: RunPlan, model: str, settings: dict) -> None:
    """Every unfinished (rank, seed, arm) of one model; each finished arm is written at once to its own JSON."""
    runs = [(rank, seed, arm) for rank in plan.ranks for seed in plan.seeds for arm in plan.arms]
    todo = [run for run in runs if not os.path.exists(arm_path(args.output_dir, model, *run))]
    logger.info("%s: %d of %d arms already finished, %d to run", model, len(runs) - len(todo), len(runs), len(todo))
    if not todo:
        return
    model_args = replace(args, model_name_or_path=model)
    calibrate = any(ARMS[base_arm(arm)][1] == "closed_form" for _, _, arm in todo)
    tokenizer, train, held_out, train_examples, windows, calibration = load_model_data(model_args, model, calibrate)
    for rank, seed, arm in todo:
        logger.info("=== %s r=%d seed=%d arm %s ===", model, rank, seed, arm)
        trainer_dir = os.path.join(args.output_dir, "trainer", model_slug(model), f"r{rank}", f"seed{seed}")
        arm_args = replace(model_args, rank=rank, seed=seed, output_dir=trainer_dir)
        dynamic_ranks = plan.dynamic_ranks[rank] if plan.dynamic_ranks else None
        result = run_arm(arm, arm_args, tokenizer, train, held_out, windows, calibration, dynamic_ranks,
                         start_path(args.output_dir, model, rank, arm))
        meta = {"threads": args.threads, "torch": torch.__version__, "platform": platform.machine(),
                "command": "python -m bench.compare_init " + shlex.join(sys.argv[1:]),
                "train_examples": train_examples, "eval_windows": int(windows.shape[0]), "add_bos": needs_bos(model)}
        record = {"model": model, "rank": rank, "seed": seed, "arm": arm, "settings": settings, "meta": meta,
                  "result": result}
        write_json(arm_path(args.output_dir, model, rank, seed, arm), record)


def write_summary(args: CompareScriptArguments, records: list[dict]) -> list[dict]:
    """`results.md`, `results.json` and `convergence.png` in `--output_dir` from every finished arm."""
    summary = summarize(records)
    decomposition = decompose(records)
    meta = {**reference_settings(records), "threads": sorted({r["meta"]["threads"] for r in records}),
            "torch": records[0]["meta"]["torch"], "arm_seconds": sum(r["result"]["seconds"] for r in records),
            "commands": sorted({r["meta"].get("command", "(not recorded)") for r in records})}
    table = (f"Fine-tuning comparison: {len(records)} finished arms; torch {meta['torch']}, "
             f"{'/'.join(map(str, meta['threads']))} thread(s); arm wall time {meta['arm_seconds'] / 60:.1f} min "
             f"in all. Command(s):\n\n" + "".join(f"    {command}\n" for command in meta["commands"]) + "\n"
             + summary_markdown(summary, records, meta) + "\n".join(decomposition_markdown(decomposition)) + "\n")
    paths = write_results(os.path.join(args.output_dir, "results"), table,
                          {"settings": meta, "summary": summary, "decomposition": decomposition, "arms": records})
    paths += (plot_summary(records, summary, os.path.join(args.output_dir, "convergence.png")),)
    print("\n" + table)
    print("Wrote " + ", ".join(paths))
    return summary


def main(args: CompareScriptArguments) -> list[dict]:
    """Run every unfinished arm of the plan (models × ranks × seeds × arms), then summarise every finished arm.

    Args:
        args: the parsed settings (`make_parser().parse_args_into_dataclasses()`).

    Returns:
        The summary: per (model, rank), mean ± std over seeds of every arm's metrics (as in `results.json`).

    Raises:
        ValueError: a bad option, or finished arms in `--output_dir` run with other settings (before any model
            loads); `--summary_only` with nothing finished.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = check_arguments(args)
    torch.set_num_threads(args.threads)
    finished = load_finished(args.output_dir)
    if args.summary_only:
        if not finished:
            raise ValueError(f"`--summary_only`: no finished arm under {args.output_dir!r}/runs; run the benchmark "
                             "first, or point `--output_dir` at its output.")
        check_compatible(finished, reference_settings(finished))  # one summary, one set of settings
        return write_summary(args, finished)
    settings = resume_settings(args)
    check_compatible(finished, settings)
    for model in plan.models:
        run_model(args, plan, model, settings)
    return write_summary(args, load_finished(args.output_dir))


def make_parser() -> HfArgumentParser:
    """The command-line parser of `CompareScriptArguments`."""
    return HfArgumentParser(CompareScriptArguments, prog="python -m bench.compare_init")


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_into_dataclasses()
    main(script_args)

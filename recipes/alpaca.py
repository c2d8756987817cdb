"""QDyLoRA + QuAILoRA fine-tuning: one run, every rank, from a calibrated start (Alpaca by default).

trl-style flags (trl's `ModelConfig` and `ScriptArguments` names) on top of the recipe's own. With no `--config`,
the dataclass defaults apply, as in trl's scripts: the embedded SmolLM2-135M-Instruct in NF4, LoRA r = 16 on all
linear layers, the embedded Alpaca data, `DynamicRankConfig`'s training defaults. The CPU demo is a config file:

    accelerate launch recipes/alpaca.py --config recipes/configs/alpaca.yaml                 # = make demo (CPU)
    accelerate launch recipes/alpaca.py --model_name_or_path meta-llama/Llama-3.2-1B --load_in_4bit --use_peft \
        --lora_r 16 --lora_target_modules q_proj v_proj --dataset_name trl-lib/Capybara        # trl's flags
    accelerate launch recipes/alpaca.py --config recipes/configs/alpaca_gpu.yaml           # 7B-class QLoRA on a GPU
    accelerate launch --num_processes 4 recipes/alpaca.py --config recipes/configs/alpaca_multi_gpu.yaml
    torchrun --nproc_per_node 2 recipes/alpaca.py --config recipes/configs/alpaca.yaml --ddp_backend gloo  # 2 CPUs

Steps: (1) load the data (any format SFTTrainer takes: conversational `messages`, prompt-completion, text; Alpaca
columns become prompt-completion), its held-out examples and the calibration text; (2) load the base quantized by
bitsandbytes (trl's `get_quantization_config`) and wrap it in its LoRA (trl's `get_peft_config`); (3) QuAILoRA
initialises the factors from calibration text (`QuAILoRAInitCallback`), and `DynamicRankTrainer` trains with a rank
drawn every optimizer step and reports the eval loss at every `eval_ranks` rank; (4) the adapter is saved, a final
lm-eval sweep over ranks runs, and requested ranks are exported as ordinary peft adapters. Every setting and the
data format are checked before the model loads. The output folder holds `adapter/`, `adapter-r{b}/` (on request),
`results.md|json|png` and `summary.json`.

Every option: `python recipes/alpaca.py --help` (trl's model and dataset options, the recipe's, every
`DynamicRankConfig` / `SFTConfig` / `TrainingArguments` option, every `QuAILoRAConfig` option (`--calibration_samples`,
`--solver`, ...), and `--config FILE.yaml`). The former `--quailora_*` flags (`--quailora_solver`, ...) still work,
with a FutureWarning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from hf_quailora import (
    DynamicRankConfig,
    DynamicRankTrainer,
    QuAILoRAInitCallback,
    export_rank,
    load_dataset_any,
    quiet_bnb_warnings,
)
from hf_quailora._io_utils import check_not_a_file, write_file_atomically
from hf_quailora.dynamic_rank.spec import check_rank_settings, check_ranks, parse_ranks
from hf_quailora.scripts import (
    RecipeArguments,
    RecipeDataArguments,
    RecipeModelConfig,
    RecipeParser,
    RecipeQuAILoRAConfig,
    check_recipe_arguments,
    is_conversational_dataset,
    load_recipe_model,
    load_sft_splits,
)
from hf_quailora.scripts.calibration import (
    TRAIN_CALIBRATION,
    calibration_source,
    check_training_text,
    training_calibration,
)


logger = logging.getLogger("recipes.alpaca")


def _ranks(text: str | None, default: list[int]) -> list[int]:
    return parse_ranks(text) if text else list(default)


def _check(recipe_args: RecipeArguments, training_args: DynamicRankConfig, model_args: RecipeModelConfig) -> None:
    """Fail on bad settings before anything is loaded (the dataclasses checked their own fields when parsed)."""
    check_recipe_arguments(model_args, recipe_args)
    if recipe_args.quailora:  # FSDP / ZeRO-3 asked for by the arguments or `accelerate launch`: refused now
        from hf_quailora.quailora.callback import check_verified_setup

        check_verified_setup(training_args)  # one process, DDP and ZeRO-1/2 pass
    max_rank = check_rank_settings(training_args, model_args.lora_r)  # eval/SoFT/choice ranks too
    check_not_a_file(training_args.output_dir)
    for name in ("sweep_ranks", "export_ranks"):  # only trained ranks can be evaluated or exported
        check_ranks(_ranks(getattr(recipe_args, name), []), 1, max_rank, name, "the trained range (up to max_rank)")
    if training_args.soft_exits or training_args.eval_exits:
        _check_exits(model_args, training_args)
    if recipe_args.sweep_tasks:
        from hf_quailora.evaluation.lm_eval_bridge import check_lm_eval_options, resolve_tasks

        check_lm_eval_options(limit=recipe_args.sweep_limit)
        resolve_tasks(recipe_args.sweep_tasks)


def _check_exits(model_args: RecipeModelConfig, training_args: DynamicRankConfig) -> None:
    """`--soft_exits` / `--eval_exits` against the model's depth, read from its config before the weights load."""
    from transformers import AutoConfig

    from hf_quailora.dynamic_rank.exits import check_exits_against_config
    from hf_quailora.embedded.models import resolve

    config = AutoConfig.from_pretrained(resolve(model_args.model_name_or_path), revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)
    check_exits_against_config(config, {name: getattr(training_args, name)
                                        for name in ("soft_exits", "eval_exits")})


def _check_chat_template(model_args: RecipeModelConfig, training_args: DynamicRankConfig) -> None:
    """Conversational data need a chat template: check the tokenizer (cheap) before the model loads."""
    if training_args.chat_template_path is not None:
        return
    from transformers import AutoTokenizer

    from hf_quailora.embedded.models import check_model_source, resolve

    path = resolve(model_args.model_name_or_path)
    check_model_source(path)  # a clear error for a missing folder, or a Hub id while offline
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The dataset is conversational, but the tokenizer of {model_args.model_name_or_path!r} has no chat "
            "template. Give one with `--chat_template_path` (a .jinja file or a model with a template), or use "
            "prompt-completion or text data."
        )


def _load_data(recipe_args, training_args, model_args, data_args):
    """Step 1: the training data and held-out examples in an SFTTrainer format; the calibration text. Loaded before
    the model, so that a wrong name, format or size fails in seconds."""
    train, held_out, kind = load_sft_splits(data_args, text_field=training_args.dataset_text_field)
    if is_conversational_dataset(train):
        _check_chat_template(model_args, training_args)
    calibration, source = None, calibration_source(recipe_args.calibration_dataset, trains=True)
    if recipe_args.quailora and source == TRAIN_CALIBRATION:
        check_training_text(train, training_args.dataset_text_field)  # pre-tokenized data: refused now
        calibration = TRAIN_CALIBRATION  # windows once the tokenizer is loaded (`_train`)
    elif recipe_args.quailora:
        calibration = load_dataset_any(source)
    return train, held_out, calibration


def _train(recipe_args, quailora_args, training_args, model, tokenizer, data):
    """Step 3: QuAILoRA start, then dynamic-rank training; returns the trainer and the start/end evaluations."""
    train, evaluation, calibration = data
    callbacks = []
    if isinstance(calibration, str) and calibration == TRAIN_CALIBRATION:  # never the held-out examples; C4 if short
        calibration = training_calibration(train, tokenizer, quailora_args, training_args.dataset_text_field)
    if recipe_args.quailora:
        callbacks.append(QuAILoRAInitCallback(calibration_dataset=calibration, config=quailora_args))
    trainer = DynamicRankTrainer(model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer, callbacks=callbacks)
    initial = None
    if not training_args.eval_on_start:  # before training and QuAILoRA (at train begin; DeepSpeed: at init end)
        initial = trainer.evaluate()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.eval_on_start:  # evaluated right after on_train_begin, i.e. at the QuAILoRA start
        initial = next((e for e in trainer.state.log_history if "eval_loss" in e), None)
    return trainer, initial, trainer.evaluate()


def _dataset_label(name: str) -> str:
    """`alpaca`, `trl-lib/Capybara`, or a file's stem: how the held-out rows are named in the results."""
    path = Path(name)
    return path.stem if path.suffix else name


def _loss_rows(trainer, evaluations: dict, dataset: str) -> list[dict]:
    """The held-out loss of each evaluation at every eval rank, as result rows."""
    rows = []
    for label, metrics in evaluations.items():
        for b in trainer.eval_ranks if metrics else []:
            exits = trainer.depth_exits.eval_exits if trainer.depth_exits is not None else []
            for name, key in [(label, f"eval_loss@r{b}"), *((f"{label} @ exit {k}", f"eval_loss@e{k}r{b}")
                                                             for k in exits)]:
                if metrics.get(key) is not None:
                    rows.append({"model": name, "rank": b, "task": f"{_dataset_label(dataset)} held-out",
                                 "metric": "eval_loss", "value": metrics[key], "stderr": None})
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


def _sweep_and_export(args, trainer, tokenizer, initial, final, summary, started) -> None:
    """Step 4 (main process): per-rank tables, the lm-eval sweep, exports, `summary.json`."""
    from hf_quailora.evaluation.reporting import write_rank_report

    data_args, training_args, model_args, recipe_args = args
    # DeepSpeed: the callback initialised at on_init_end, before the first evaluation
    early = any(getattr(callback, "_initialised", False) for callback in trainer.callback_handler.callbacks)
    start_label = "start" if training_args.eval_on_start or not recipe_args.quailora or early else "before QuAILoRA"
    rows = _loss_rows(trainer, {start_label: initial, "after training": final}, data_args.dataset_name)
    if recipe_args.sweep_tasks:
        from hf_quailora.evaluation.lm_eval_bridge import evaluate_ranks

        rows += evaluate_ranks(
            trainer.model, tokenizer, _ranks(recipe_args.sweep_ranks, trainer.eval_ranks), recipe_args.sweep_tasks,
            limit=recipe_args.sweep_limit, rank_scaling=training_args.rank_scaling,
            baselines={"base model (no adapter)": "no_adapter"}, label="after training",
        )
    title = (f"{model_args.model_name_or_path} ({model_args.quantization}) on "
             f"{_dataset_label(data_args.dataset_name)}")
    paths = write_rank_report(rows, training_args.output_dir, title=title)
    exported = {
        b: export_rank(trainer.model, b, os.path.join(training_args.output_dir, f"adapter-r{b}"),
                       rank_scaling=training_args.rank_scaling)
        for b in _ranks(recipe_args.export_ranks, [])
    }
    summary.update({"initial_metrics": initial, "final_metrics": final, "results": paths, "exported": exported,
                    "seconds": time.perf_counter() - started})
    text = json.dumps(summary, indent=1, default=str)
    write_file_atomically(os.path.join(training_args.output_dir, "summary.json"),
                          lambda tmp: Path(tmp).write_text(text))
    _print_summary(summary, rows, trainer)


def main(data_args: RecipeDataArguments, training_args: DynamicRankConfig, model_args: RecipeModelConfig,
         recipe_args: RecipeArguments, quailora_args: RecipeQuAILoRAConfig) -> dict:
    """Run the recipe; the arguments are what `parse_args_and_config()` returns, in trl's order."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_bnb_warnings()
    _check(recipe_args, training_args, model_args)
    started = time.perf_counter()
    data = _load_data(recipe_args, training_args, model_args, data_args)  # 1.
    model, tokenizer = load_recipe_model(model_args, trust_remote_code=training_args.trust_remote_code)  # 2.
    trainer, initial, final = _train(recipe_args, quailora_args, training_args, model, tokenizer, data)  # 3.
    adapter_dir = os.path.join(training_args.output_dir, "adapter")  # 4. save, sweep, export
    trainer.save_model(adapter_dir)
    summary: dict = {"output_dir": training_args.output_dir, "adapter": adapter_dir, "eval_ranks": trainer.eval_ranks,
                     "dataset": data_args.dataset_name, "num_train_examples": len(data[0])}
    if trainer.is_world_process_zero():
        _sweep_and_export((data_args, training_args, model_args, recipe_args), trainer, tokenizer, initial, final,
                          summary, started)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # No collective follows (process 0 sweeps alone). The exit itself is made safe by hf_quailora/_exit_guard.py.
        torch.distributed.destroy_process_group()
    return summary


def make_parser() -> RecipeParser:
    """trl's dataset and model arguments, the training config, the recipe's own options (trl's order), and the
    QuAILoRA settings; the former `--quailora_*` flags are renamed with a FutureWarning."""
    return RecipeParser((RecipeDataArguments, DynamicRankConfig, RecipeModelConfig, RecipeArguments,
                         RecipeQuAILoRAConfig))


def parse_args_and_config(parser: RecipeParser | None = None, args: list[str] | None = None):
    """Parse `--config FILE.yaml` (optional) plus command-line overrides, as trl's scripts do.

    Returns:
        `(data_args, training_args, model_args, recipe_args, quailora_args)`.
    """
    parser = parser or make_parser()
    return parser.parse_args_and_config(args=list(args if args is not None else sys.argv[1:]))


if __name__ == "__main__":
    main(*parse_args_and_config())

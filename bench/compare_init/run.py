"""The data of the fine-tuning comparison and one arm's run: model, trainer, adapter start, training, evaluation."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_quailora import (
    DynamicRankConfig,
    DynamicRankTrainer,
    QuAILoRAConfig,
    compute_perplexity,
    load_dataset_any,
    make_token_windows,
    quailora_init,
    use_rank,
)
from hf_quailora.embedded.data import load_alpaca_sft, split_holdout

from .._common import peft_model, write_json
from .arms import ALPACA_TRAIN, ARMS, CompareScriptArguments, arm_label, base_arm, lr_scale
from .cloze import cloze_accuracy
from .store import resume_settings


logger = logging.getLogger(__name__)


class HeldOutPerplexityCallback(TrainerCallback):
    """Adds held-out perplexity to every evaluation and records the convergence curve of one arm."""

    def __init__(self, windows: torch.Tensor, batch_size: int = 8):
        self.windows = windows
        self.batch_size = batch_size
        self.examples: int | None = None  # held-out Alpaca examples of the evaluation under way (set by the caller)
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if "eval_loss" not in (metrics or {}):  # the dynamic arm's rank sweeps use another prefix
            return
        entry = {"step": state.global_step, "eval_loss": metrics.get("eval_loss"), "alpaca_examples": self.examples}
        entry.update({key[len("eval_"):]: value for key, value in metrics.items() if key.startswith("eval_loss@r")})
        started = time.perf_counter()
        if self.history and self.history[-1]["step"] == state.global_step:  # same weights: no second pass
            entry["perplexity"] = self.history[-1]["perplexity"]
        else:
            entry["perplexity"] = compute_perplexity(model, self.windows, self.batch_size)
        # evaluation costs, for planning longer runs: the Alpaca loss (Trainer's eval_runtime) and the perplexity
        entry.update(eval_runtime=metrics.get("eval_runtime"), perplexity_seconds=time.perf_counter() - started)
        self.history.append(entry)
        logger.info("step %d: %s", state.global_step, entry)


def load_alpaca_split(args: CompareScriptArguments):
    """The Alpaca training examples and the evaluated held-out examples, the same for every arm.

    The hold-out is the library's (`split_holdout`): the last `--holdout_examples` examples are never trained on.

    Returns:
        `(train, held_out, train_examples)`: the first `--train_examples` examples (default: all before the
        hold-out), the last `--eval_examples` examples, and the number of training examples.

    Raises:
        ValueError: the data are too few for `--train_examples` plus the hold-out.
    """
    alpaca = load_alpaca_sft(args.train_data)
    default_train = len(alpaca) - args.holdout_examples  # all before the held-out tail
    train_examples = args.train_examples if args.train_examples is not None else default_train
    try:
        available, tail = split_holdout(alpaca, args.holdout_examples)
    except ValueError as err:  # nothing would be left to train on
        raise ValueError(_too_few(args, len(alpaca), train_examples)) from err
    if train_examples > len(available):
        raise ValueError(_too_few(args, len(alpaca), train_examples))
    train = available.select(range(train_examples))
    held_out = tail.select(range(len(tail) - args.eval_examples, len(tail)))
    return train, held_out, train_examples


def calibration_texts(args: CompareScriptArguments, train) -> list[str]:
    """The text QuAILoRA calibrates on: with `--calibration_data alpaca_train`, the arm's own training examples
    (`train` of `load_alpaca_split`: prompt followed by response; the held-out tail never enters), else the text of
    `--calibration_data` (`load_dataset_any`: `c4`, `wiki`, a file)."""
    if args.calibration_data == ALPACA_TRAIN:
        return [example["prompt"] + example["completion"] for example in train]
    return load_dataset_any(args.calibration_data)["text"]


def token_windows(args: CompareScriptArguments, tokenizer, train, add_bos: bool, calibrate: bool):
    """The held-out perplexity windows and (if `calibrate`) the calibration windows, `(windows, calibration)`.

    When both come from the same text (`--calibration_data wiki` with `--perplexity_data wiki`), the calibration
    windows are the ones after the held-out windows, so that the held-out text never calibrates the start (as in
    `bench/bench_calibration_size.py`); the held-out windows are the same either way.

    Raises:
        ValueError: the shared text holds no window after the held-out ones.
    """
    texts = load_dataset_any(args.perplexity_data)["text"]
    if not calibrate:
        return make_token_windows(tokenizer, texts, args.window_length, args.eval_windows, add_bos=add_bos), None
    if args.calibration_data != args.perplexity_data:
        return (make_token_windows(tokenizer, texts, args.window_length, args.eval_windows, add_bos=add_bos),
                make_token_windows(tokenizer, calibration_texts(args, train), args.window_length,
                                   args.calibration_windows, add_bos=add_bos))
    every = make_token_windows(tokenizer, texts, args.window_length, args.eval_windows + args.calibration_windows,
                               add_bos=add_bos)
    if every.shape[0] <= args.eval_windows:
        raise ValueError(f"{args.perplexity_data!r} holds {every.shape[0]} windows of {args.window_length} tokens: "
                         f"none is left to calibrate on after the {args.eval_windows} held-out ones; lower "
                         "`--eval_windows` or `--window_length`, or calibrate on other text.")
    return every[:args.eval_windows], every[args.eval_windows:]


def _too_few(args: CompareScriptArguments, size: int, train_examples: int) -> str:
    return (
        f"{args.train_data!r} has {size} examples: too few for --train_examples {train_examples} plus a "
        f"held-out tail of --holdout_examples {args.holdout_examples}; lower one of them."
    )


def training_settings(args: CompareScriptArguments, arm: str) -> dict:
    """The `SFTConfig` / `DynamicRankConfig` keyword arguments shared by every arm."""
    return dict(
        output_dir=os.path.join(args.output_dir, arm),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate * lr_scale(arm),  # --quailora_lr_scale: quailora@lr<scale> arms
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.eval_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="no",
        report_to="none",
        bf16=False,  # fp32 compute in every arm; SFTConfig's bf16 default fails on a CPU
        use_cpu=not torch.cuda.is_available(),
        max_length=args.max_length,
        seed=args.seed,
        gradient_checkpointing=False,  # faster on a CPU; memory is no issue at this size
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def build_trainer(arm, args, model, tokenizer, train, held_out, windows, dynamic_ranks):
    """The arm's trainer (`DynamicRankTrainer` for the dynamic arm, else `SFTTrainer`) with fp32/bf16 adapters.

    Returns:
        `(trainer, perplexity, full)`: the trainer, its `HeldOutPerplexityCallback`, and the tokenized held-out set
        when `--curve_eval_examples` gives the periodic evaluations a subset of it (else `None`; the trainer's own
        evaluation set is then the full held-out set).
    """
    settings = training_settings(args, arm)
    perplexity = HeldOutPerplexityCallback(windows, args.eval_batch_size)
    trainer_kwargs = dict(
        train_dataset=train, eval_dataset=held_out, processing_class=tokenizer, callbacks=[perplexity]
    )
    if ARMS[base_arm(arm)][2]:
        config = DynamicRankConfig(**settings, min_rank=1, rank_scaling="constant",
                                   update_rule=args.dynamic_update_rule, eval_ranks=dynamic_ranks)
        trainer = DynamicRankTrainer(model, args=config, **trainer_kwargs)
    else:
        trainer = SFTTrainer(model, args=SFTConfig(**settings), **trainer_kwargs)
    for name, dataset in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if len(dataset) == 0:  # trl drops examples whose response was truncated away entirely
            raise ValueError(
                f"No {name} example keeps any response token within --max_length {args.max_length}; raise it."
            )
    full = None
    if args.curve_eval_examples is not None and args.curve_eval_examples < len(trainer.eval_dataset):
        full = trainer.eval_dataset  # tokenized: the start and the end are scored on all of it
        trainer.eval_dataset = full.select(range(len(full) - args.curve_eval_examples, len(full)))
    perplexity.examples = len(trainer.eval_dataset)
    # trl casts the adapters of quantized models to bf16 (QLoRA's recipe); the optimizer does not exist yet, so
    # recasting here gives every arm the same adapter dtype, and QuAILoRA writes its factors into that dtype.
    dtype = getattr(torch, args.adapter_dtype)
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return trainer, perplexity, full


def initialize_adapter(trainer, solver: str | None, calibration, window_length: int) -> float | None:
    """Write the arm's adapter start (SVD or QuAILoRA; nothing for B = 0); returns its seconds (None for B = 0)."""
    if solver is None:
        return None
    init_started = time.perf_counter()
    quailora_init(
        trainer.model,
        calibration if solver != "svd" else None,
        QuAILoRAConfig(solver=solver, calibration_samples=None, calibration_length=window_length,
                       show_progress=False),
    )
    return time.perf_counter() - init_started


def measure_dynamic_ranks(trainer, windows, ranks, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Alpaca response loss (one evaluate() call covers every rank) and held-out perplexity at each rank."""
    trainer.eval_ranks = ranks
    metrics = trainer.evaluate(metric_key_prefix="rank_sweep")
    out = {}
    for b in ranks:
        with use_rank(trainer.model, b, rank_scaling="constant"):
            perplexity = compute_perplexity(trainer.model, windows, batch_size)
        out[str(b)] = {"eval_loss": metrics[f"rank_sweep_loss@r{b}"], "perplexity": perplexity}
    return out


def evaluate_full(trainer, perplexity, full, curve: bool = True) -> None:
    """Evaluate the start or the end: on the full held-out set `full` (when the periodic evaluations use a subset),
    and on the periodic subset too when `curve` (so the curve has the point)."""
    if full is not None:
        periodic, perplexity.examples = perplexity.examples, len(full)
        trainer.evaluate(eval_dataset=full)
        perplexity.examples = periodic
    if full is None or curve:
        trainer.evaluate()


def train_and_evaluate(trainer, perplexity, windows, dynamic_ranks, result: dict, started: float,
                       full=None, start_cache: str | None = None, settings: dict | None = None,
                       cloze: tuple = (None, None)) -> None:
    """Evaluate at the start, train (evaluating every `--eval_steps`), evaluate at the end; fills `result`.

    Args:
        dynamic_ranks: the ranks of the per-rank evaluation of the dynamic arm (`None` for the other arms).
        result: the arm's results so far; the metrics, curves and times are added to it.
        started: `time.perf_counter()` when the arm started (for its total seconds).
        full: the tokenized full held-out set when the periodic evaluations use a subset (`build_trainer`).
        start_cache: a JSON file of this start's evaluations at step 0, shared across seeds (`store.start_path`):
            read when present and run with the same `settings` (entries marked `start_reused`), else written after
            evaluating.
        settings: the arm's `store.resume_settings`, stored with the shared start.
        cloze: `(tokenizer, documents)`: with `documents` set (`--cloze_examples`), the `quailora_wiki_cloze`
            accuracy at the start (kept in the shared start) and the end (`cloze_start`, `cloze_end`).
    """
    dynamic = dynamic_ranks is not None
    batch = trainer.args.per_device_eval_batch_size
    if dynamic:
        result["per_rank"] = {"start": measure_dynamic_ranks(trainer, windows, dynamic_ranks, batch)}
        trainer.eval_ranks = [trainer.max_rank]  # intermediate evaluations at r_max only (cost)
    cached = None
    if start_cache is not None and os.path.exists(start_cache):
        with open(start_cache) as handle:
            cached = json.load(handle)
    if cached is not None and _same_settings(cached["settings"], settings):
        perplexity.history.extend({**entry, "start_reused": True} for entry in cached["history"])
    else:
        evaluate_full(trainer, perplexity, full)
        _add_cloze(trainer, perplexity.history[0], *cloze)
        if start_cache is not None:
            write_json(start_cache, {"settings": settings, "history": perplexity.history})
    train_started = time.perf_counter()
    trainer.train()
    result["train_seconds"] = time.perf_counter() - train_started
    last_done = perplexity.history[-1]["step"] == trainer.state.global_step
    if full is not None or not last_done:
        evaluate_full(trainer, perplexity, full, curve=not last_done)
    _add_cloze(trainer, perplexity.history[-1], *cloze)
    if dynamic:
        trainer.eval_ranks = dynamic_ranks
        result["per_rank"]["end"] = measure_dynamic_ranks(trainer, windows, dynamic_ranks, batch)
    scored = [entry for entry in perplexity.history if full is None or entry["alpaca_examples"] == len(full)]
    start, end = scored[0], scored[-1]
    result.update(
        perplexity_start=start["perplexity"], perplexity_end=end["perplexity"],
        eval_loss_start=start["eval_loss"], eval_loss_end=end["eval_loss"],
        cloze_start=start.get("cloze_accuracy"), cloze_end=perplexity.history[-1].get("cloze_accuracy"),
        history=perplexity.history, seconds=time.perf_counter() - started,
        train_loss=[(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
    )


def _same_settings(stored: dict, settings: dict | None) -> bool:
    """Whether a shared start was run with `settings`; a setting added since (absent there) matches its None."""
    return settings is not None and all(stored.get(key) == value for key, value in settings.items()) and all(
        key in settings for key in stored)


def _add_cloze(trainer, entry: dict, tokenizer, documents: int | None) -> None:
    """Add the `quailora_wiki_cloze` accuracy (and its seconds) of the trainer's model to a history entry."""
    if documents is None or tokenizer is None:
        return
    started = time.perf_counter()
    entry["cloze_accuracy"] = cloze_accuracy(trainer.model, tokenizer, documents,
                                             trainer.args.per_device_eval_batch_size)
    entry["cloze_seconds"] = time.perf_counter() - started
    logger.info("step %d: quailora_wiki_cloze accuracy %.3f on %d documents", entry["step"],
                entry["cloze_accuracy"], documents)


def run_arm(arm, args, tokenizer, train, held_out, windows, calibration, dynamic_ranks, start_cache=None) -> dict:
    """Fine-tune and evaluate one arm from a freshly loaded model; returns its results (curves included).

    `start_cache`: see `train_and_evaluate` (the evaluations at step 0 shared across seeds)."""
    quantization, solver, dynamic = ARMS[base_arm(arm)]
    started = time.perf_counter()
    # the base in the arm's quantization with a fresh LoRA, r = lora_alpha = --rank; the seed: the same A in every arm
    model = peft_model(args.model_name_or_path, quantization, rank=args.rank, target_modules=args.target_modules,
                       seed=args.seed, task_type="CAUSAL_LM")
    trainer, perplexity, full = build_trainer(arm, args, model, tokenizer, train, held_out, windows, dynamic_ranks)
    init_seconds = initialize_adapter(trainer, solver, calibration, args.window_length)

    result: dict = {"arm": arm, "label": arm_label(arm), "quantization": quantization, "init": solver or "B = 0",
                    "init_seconds": init_seconds, "learning_rate": trainer.args.learning_rate}
    train_and_evaluate(trainer, perplexity, windows, dynamic_ranks if dynamic else None, result, started, full,
                       start_cache, resume_settings(args), (tokenizer, args.cloze_examples))
    logger.info("%s: ppl %.3f -> %.3f, Alpaca loss %.4f -> %.4f", arm, result["perplexity_start"],
                result["perplexity_end"], result["eval_loss_start"], result["eval_loss_end"])
    del trainer, model
    return result

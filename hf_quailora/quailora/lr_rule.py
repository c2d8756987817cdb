"""The learning-rate rule as `QuAILoRAInitCallback` applies it (`QuAILoRAConfig.lr_scale`; the measurement and its
numbers: quailora/first_step.py, docs/quailora.md "The learning rate of a QuAILoRA start").

"auto" is an optional refinement of the user's rate: when it cannot be measured (a sharded or wrapped model, too
little data, a failure on any process, which every process then hears of through the measurement's agreement) the
rate is kept, with a warning, and the run goes on. A number the user gave is applied or refused with an error.
"""

from __future__ import annotations

import logging

import torch

from .._dist_utils import has_sharded_parameters
from .calibration import make_calibration_batches
from .first_step import FirstStep, parse_lr_scale, quailora_lr_scale, scale_learning_rate


logger = logging.getLogger(__name__)


def resolve_lr_scale(config, learning_rate: float, model, data, tokenizer, wrapped: bool,
                     adapter_name: str = "default") -> tuple[float, FirstStep | None]:
    """The factor `config.lr_scale` gives for `model`'s start: `(scale, measurement or None)`.

    "auto" takes and measures the step on `data`, the train batches when the trainer gives them (the data Adam's
    first step will follow, though over every token, not only trl's completion tokens), else the calibration data:
    measured on C4, Gemma-3-270m's first step read 0.09 of its correction (rate kept), on its training examples 0.60
    (rate halved), bench/RESULTS.md, issue 36. It runs with the RNG state forked, so the run draws the same random
    numbers as with `lr_scale=1`. Every process calls this (the measurement all-reduces under DDP).

    Args:
        config (`QuAILoRAConfig`): its `lr_scale`, `calibration_length` and `calibration_batch_size`.
        learning_rate (`float`): the run's rate; at 0 there is nothing to scale.
        model: the unwrapped peft model, its start written.
        data: train dataloader, or calibration data (`make_calibration_batches` takes either).
        tokenizer: for text calibration data.
        wrapped (`bool`): FSDP or DeepSpeed wrap the model (initialised at `on_init_end`).
        adapter_name (`str`, defaults to `"default"`).
    """
    scale = parse_lr_scale(config.lr_scale)
    if scale is not None:
        return scale, None
    if not learning_rate > 0:
        return 1.0, None
    if wrapped or has_sharded_parameters(model):  # FSDP / DeepSpeed: whole weights are not held here
        logger.info("QuAILoRA lr_scale='auto' is not measured on a sharded or wrapped (FSDP, DeepSpeed) model: the "
                    "learning rate is kept. Set lr_scale to a number to scale it (quailora/first_step.py).")
        return 1.0, None
    try:
        with torch.random.fork_rng():
            try:
                batches = make_calibration_batches(data, tokenizer, 8, config.calibration_length,
                                                   config.calibration_batch_size)
            except (TypeError, ValueError):
                batches = []  # the measurement all-reduces the count: TooFewSequencesError on every process
            return quailora_lr_scale(model, batches, learning_rate, adapter_name=adapter_name,
                                     max_length=config.calibration_length)
    except Exception as err:  # noqa: BLE001 - logged; the run goes on at the user's rate
        logger.warning("QuAILoRA lr_scale='auto' keeps the learning rate (the first step was not measured: %s)", err)
        return 1.0, None


def apply_lr_scale(optimizer, lr_scheduler, scale: float, setting, auto: bool) -> None:
    """`scale` on the created optimizer and scheduler (`scale_learning_rate`); `setting` is `config.lr_scale` as
    given, `auto` whether the factor came from the rule.

    Raises:
        ValueError: a number the user gave, and no optimizer or a scheduler whose rates cannot follow ("auto" warns
            and keeps the rate instead).
    """
    if optimizer is None:
        if auto:
            logger.warning("QuAILoRA lr_scale='auto' gave x %g, but on_train_begin got no optimizer to apply it to: "
                           "multiply the learning rate yourself, or set lr_scale=1.", scale)
            return
        raise ValueError(f"QuAILoRA's lr_scale ({setting!r}) needs the trainer's optimizer at `on_train_begin`; "
                         "none was given. Set `lr_scale=1` and scale the learning rate yourself.")
    try:
        scale_learning_rate(optimizer, lr_scheduler, scale)
    except ValueError as err:
        if not auto:
            raise
        logger.warning("QuAILoRA lr_scale='auto' keeps the learning rate: %s", err)

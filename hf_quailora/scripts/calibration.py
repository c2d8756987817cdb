"""Calibrating the recipes' QuAILoRA start on their own training data (`--calibration_dataset train`), issue 36.

Issue 36 asked whether calibrating on the fine-tuning data rather than C4 closes more of the NF4 → int8 gap after
fine-tuning; bench/RESULTS.md, "Issue 36: calibrating on the task", has the measurement. The training examples become
text (`training_texts`), are concatenated and cut into windows of `calibration_length`
tokens, as `bench/compare_init --calibration_data alpaca_train` measured it (`training_calibration`). The held-out
examples never enter. Data too short to fill `calibration_samples` windows fall back to C4, and the log says so.

Example:

```python
from hf_quailora.scripts.calibration import training_calibration

calibration = training_calibration(train, tokenizer, quailora_args)  # token windows, or C4 when train is too short
callback = QuAILoRAInitCallback(calibration_dataset=calibration, config=quailora_args)
```
"""

from __future__ import annotations

import logging

import torch


TRAIN_CALIBRATION = "train"  # `--calibration_dataset train`: the recipe's own training examples
AUTO_CALIBRATION = "auto"  # the training examples in a recipe that trains, else C4
FALLBACK_CALIBRATION = "c4"

logger = logging.getLogger(__name__)


def calibration_source(name: str, trains: bool) -> str:
    """`--calibration_dataset` for a recipe: `"auto"` is `"train"` in one that trains, `"c4"` in an init-only one;
    any other name is kept."""
    if name == AUTO_CALIBRATION:
        return TRAIN_CALIBRATION if trains else FALLBACK_CALIBRATION
    return name


def _as_text(value, tokenizer=None) -> str:
    """A prompt, completion or conversation as plain text: a string as it is; messages through the tokenizer's chat
    template when it has one (the text the model trains on), else their contents one per line."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(message, dict) for message in value):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(value, tokenize=False)
        return "\n".join(str(message.get("content", message.get("value", ""))) for message in value)
    return str(value)


def _row_text(columns: set[str], text_field: str, tokenizer=None):
    """The function giving one training row's text, for a dataset with `columns` (see `training_texts`)."""
    if {"prompt", "completion"} <= columns:
        return lambda row: _as_text(row["prompt"], tokenizer) + _as_text(row["completion"], tokenizer)
    for key in ("messages", "conversations"):
        if key in columns:
            return lambda row: _as_text(row[key], tokenizer)
    if text_field in columns:
        return lambda row: _as_text(row[text_field], tokenizer)
    raise ValueError(
        f"`--calibration_dataset train` needs text in the training data; its columns are {sorted(columns)}. Give a "
        "calibration text instead (`--calibration_dataset c4`, `wiki`, a file or a Hub id)."
    )


def check_training_text(train, text_field: str = "text") -> None:
    """Raise the `ValueError` of `training_texts` now (before the model loads) when `train` holds no text."""
    _row_text(set(train.column_names), text_field)


def training_texts(train, text_field: str = "text", max_chars: int | None = None, tokenizer=None) -> list[str]:
    """The training examples as calibration text, in the dataset's order: prompt then completion
    (prompt-completion), the conversation (conversational: through `tokenizer`'s chat template when it has one,
    else the messages' contents one per line), the text field (text).

    `max_chars` stops once the texts hold that many characters (a large dataset is not read whole).

    Raises:
        ValueError: pre-tokenized data (`input_ids` only: no text to calibrate on), naming the other choices.
    """
    as_text = _row_text(set(train.column_names), text_field, tokenizer)
    texts, chars = [], 0
    for row in train:
        if max_chars is not None and chars >= max_chars:
            break
        texts.append(as_text(row))
        chars += len(texts[-1])
    return texts


def training_calibration(train, tokenizer, config, text_field: str = "text"):
    """Calibration windows from the training examples, or C4 when they are too short.

    Args:
        train: the training split (`datasets.Dataset` in an `SFTTrainer` format); never the held-out examples.
        tokenizer: the model's tokenizer.
        config (`QuAILoRAConfig`): `calibration_length` tokens per window, `calibration_samples` windows (`None`:
            every full window).
        text_field (`str`, defaults to `"text"`): `SFTConfig.dataset_text_field`.

    Returns:
        `torch.LongTensor` `(windows, calibration_length)`, or the C4 text (`load_dataset_any("c4")`) when the
        training text fills fewer than `calibration_samples` windows (logged as a warning).
    """
    from ..embedded import load_dataset_any

    wanted = config.calibration_samples
    # enough text for the windows at up to 8 characters a token (typical: 3–5); all of it if that falls short
    texts = training_texts(train, text_field, None if wanted is None else 8 * wanted * config.calibration_length,
                           tokenizer)
    windows = _windows(texts, tokenizer, config.calibration_length, wanted)
    if windows.shape[0] < (wanted or 1) and len(texts) < len(train):
        texts = training_texts(train, text_field, tokenizer=tokenizer)
        windows = _windows(texts, tokenizer, config.calibration_length, wanted)
    if windows.shape[0] < (wanted or 1):
        logger.warning("The %d training examples fill %d calibration windows of %d tokens, fewer than "
                       "calibration_samples=%s: QuAILoRA calibrates on %s instead.", len(texts), windows.shape[0],
                       config.calibration_length, wanted, FALLBACK_CALIBRATION)
        return load_dataset_any(FALLBACK_CALIBRATION)
    logger.info("QuAILoRA calibrates on the training data: %d windows of %d tokens from the first %d examples.",
                windows.shape[0], config.calibration_length, len(texts))
    return windows


def _windows(texts: list[str], tokenizer, length: int, wanted: int | None) -> torch.Tensor:
    """`make_token_windows` of `texts`, BOS first where the tokenizer starts texts with it; none: an empty tensor."""
    from ..tokens import make_token_windows, tokenizer_adds_bos

    try:
        return make_token_windows(tokenizer, texts, length, wanted, add_bos=tokenizer_adds_bos(tokenizer))
    except ValueError:  # not even one window
        return torch.empty(0, length, dtype=torch.long)

"""Training data for the recipes in any format trl's `SFTTrainer` takes, checked before the model loads.

| format | columns | loss |
|---|---|---|
| conversational | `messages` (`{"role", "content"}` lists), or ShareGPT's `conversations` | every token (or trl's `assistant_only_loss`) |
| prompt-completion | `prompt` and `completion` (strings or message lists) | the completion |
| text | `text` (or `SFTConfig.dataset_text_field`) | every token |
| tokenized | `input_ids` | every token |
| Alpaca | `instruction`, `output`, optional `input` | turned into prompt-completion (the response) |

Example:

```python
from hf_quailora.scripts.args import RecipeDataArguments
from hf_quailora.scripts.sft_data import load_sft_splits

train, held_out, kind = load_sft_splits(RecipeDataArguments(dataset_name="alpaca", num_eval_examples=16))
# 799 and 16 prompt-completion examples, kind == "alpaca"
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..embedded.data import EMBEDDED_DATASETS, _load_hub_dataset, format_alpaca, load_dataset_any, split_holdout


if TYPE_CHECKING:
    import datasets

    from .args import RecipeDataArguments

__all__ = ["SFT_FORMATS", "detect_sft_format", "is_conversational_dataset", "load_sft_splits"]

logger = logging.getLogger(__name__)

SFT_FORMATS = ("conversational", "prompt-completion", "text", "tokenized", "alpaca")


def detect_sft_format(dataset: datasets.Dataset, name: str = "the dataset", text_field: str = "text") -> str:
    """Which `SFT_FORMATS` entry `dataset` is in, judged by its columns (and its first row for messages).

    Args:
        dataset (`datasets.Dataset`): the training split.
        name (`str`): how to call it in an error.
        text_field (`str`, defaults to `"text"`): the text column (`SFTConfig.dataset_text_field`).

    Returns:
        `str`: `"conversational"`, `"prompt-completion"`, `"text"`, `"tokenized"` or `"alpaca"`.

    Raises:
        ValueError: none of the formats; the message lists the columns found and the ones expected.

    Example:

    ```python
    detect_sft_format(datasets.Dataset.from_dict({"text": ["Hello."]}))  # "text"
    ```
    """
    from trl.data_utils import is_conversational, is_conversational_from_value

    columns = set(dataset.column_names)
    if "input_ids" in columns:  # trl's test for pre-tokenized data
        return "tokenized"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    for key in ("messages", "conversations"):
        if key in columns:
            first = dataset[0]
            if not (is_conversational(first) or is_conversational_from_value(first)):
                raise ValueError(
                    f"{name}'s `{key}` column does not hold a list of messages: its first row is "
                    f"{str(first[key])[:200]!r}; each row must be a list of {{'role': ..., 'content': ...}} "
                    "(or ShareGPT's {'from': ..., 'value': ...})."
                )
            return "conversational"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if text_field in columns:
        return "text"
    raise ValueError(
        f"{name} has the columns {sorted(columns)}, which are none of the formats SFTTrainer trains on. Expected one "
        f"of: 'messages' (conversational), 'prompt' + 'completion' (prompt-completion), '{text_field}' (text; "
        "`--dataset_text_field` names another column), 'input_ids' (tokenized), or Alpaca's 'instruction' + "
        "'output' (+ 'input'). Rename the columns or convert the data."
    )


def _load_splits(data_args: RecipeDataArguments) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and, when the source has one, the test split."""
    import datasets

    name, config = str(data_args.dataset_name), data_args.dataset_config
    path = Path(name).expanduser()
    if name.lower() in EMBEDDED_DATASETS or path.is_file():
        if config is not None or data_args.dataset_train_split != "train":
            raise ValueError(
                f"{name!r} is a single file with one split: `--dataset_config` and `--dataset_train_split` apply to "
                "Hub datasets and folders only; remove them."
            )
        return load_dataset_any(name), None
    splits = datasets.load_dataset(str(path), name=config) if path.is_dir() else _load_hub_dataset(name, None,
                                                                                                 name=config)
    if data_args.dataset_train_split not in splits:
        raise ValueError(
            f"`--dataset_train_split` {data_args.dataset_train_split!r} is not a split of {name!r}; it has "
            f"{sorted(splits)}."
        )
    train = splits[data_args.dataset_train_split]
    if len(train) == 0:
        raise ValueError(f"{name!r} holds no training examples; give a non-empty dataset.")
    test = splits[data_args.dataset_test_split] if data_args.dataset_test_split in splits else None
    return train, test


def _to_prompt_completion(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(format_alpaca, remove_columns=dataset.column_names)


def load_sft_splits(
    data_args: RecipeDataArguments, text_field: str = "text"
) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Load the recipe's training data and its held-out examples, in a format `SFTTrainer` takes.

    The test split (`dataset_test_split`) is the held-out data when the source has one; otherwise the last
    `eval_holdout` training examples are. Alpaca data become prompt-completion (loss on the response only).

    Args:
        data_args (`RecipeDataArguments`): which data, splits and sizes.
        text_field (`str`, defaults to `"text"`): `SFTConfig.dataset_text_field`.

    Returns:
        `(train, held_out, format)`: `held_out` holds the first `num_eval_examples` held-out examples.

    Raises:
        ValueError: an unknown name or file; a missing split; a format none of `SFT_FORMATS` (naming the columns);
            a hold-out that leaves nothing to train on.
    """
    name = str(data_args.dataset_name)
    train, held_out = _load_splits(data_args)
    kind = detect_sft_format(train, repr(name), text_field)
    if held_out is not None and detect_sft_format(held_out, f"{name!r} ({data_args.dataset_test_split})",
                                                  text_field) != kind:
        raise ValueError(f"{name!r}: the train and test splits are in different formats.")
    if kind == "alpaca":
        train = _to_prompt_completion(train)
        held_out = _to_prompt_completion(held_out) if held_out is not None else None
    if held_out is None:
        try:
            train, held_out = split_holdout(train, data_args.eval_holdout)
        except ValueError as err:
            raise ValueError(f"`--eval_holdout`: {err}") from err
    if len(held_out) < data_args.num_eval_examples:
        raise ValueError(
            f"`--num_eval_examples` ({data_args.num_eval_examples}) exceeds the {len(held_out)} held-out examples "
            f"of {name!r}."
        )
    if data_args.num_train_examples is not None:
        train = train.select(range(min(len(train), data_args.num_train_examples)))
    logger.info("Training data %r: %s format, %d examples (%d held out).", name, kind, len(train), len(held_out))
    return train, held_out.select(range(data_args.num_eval_examples)), kind


def is_conversational_dataset(dataset: datasets.Dataset) -> bool:
    """Whether the first row holds chat messages (which need the tokenizer's chat template)."""
    from trl.data_utils import is_conversational, is_conversational_from_value

    first = dataset[0]
    return is_conversational(first) or is_conversational_from_value(first)

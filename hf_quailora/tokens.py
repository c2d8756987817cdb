"""Token ids: windows of tokenized text for calibration and perplexity (`tokenizer_adds_bos` says whether they start
with BOS), and the check that ids fit a vocabulary.

Example:

```python
from hf_quailora import load_dataset_any, make_token_windows

windows = make_token_windows(tokenizer, load_dataset_any("wiki")["text"], 256, num_windows=32)
```
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with BOS (Gemma's does, SmolLM2's does not): calibration windows cut from
    a token stream (`make_token_windows`) then start with BOS too, as every sequence the model sees does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def make_token_windows(
    tokenizer,
    texts: list[str],
    window_length: int,
    num_windows: int | None = None,
    add_bos: bool = False,
) -> torch.Tensor:
    """Concatenate `texts` (separated by EOS) and cut the token stream into non-overlapping windows.

    Used for calibration batches and for held-out perplexity. The order is deterministic.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts (`list[str]`): documents.
        window_length (`int`): tokens per window.
        num_windows (`int`, *optional*): stop after this many windows (all full windows when `None`).
        add_bos (`bool`, defaults to `False`): start every window with the BOS token (Gemma needs it).

    Returns:
        `torch.LongTensor` of shape `(num_windows, window_length)`.

    Raises:
        ValueError: `window_length < 2`, or the texts hold fewer tokens than one window.

    Example:

    ```python
    windows = make_token_windows(tokenizer, load_dataset_any("wiki")["text"], 256, num_windows=32)
    ```
    """
    import torch

    if window_length < 2:
        raise ValueError(f"`window_length` ({window_length}) must be at least 2.")
    body = window_length - 1 if add_bos else window_length
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    needed = None if num_windows is None else num_windows * body
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
        if needed is not None and len(stream) >= needed:
            break
    count = len(stream) // body if num_windows is None else min(num_windows, len(stream) // body)
    if count == 0:
        raise ValueError(
            f"The texts hold {len(stream)} tokens, fewer than one window of {body}; give more text or a shorter "
            "`window_length`."
        )
    if num_windows is not None and count < num_windows:
        logger.warning("Only %d windows of %d tokens fit in the texts (asked for %d).", count, body, num_windows)
    windows = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    if add_bos:
        bos = torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long)
        windows = torch.cat([bos, windows], dim=1)
    return windows


def check_token_ids(ids: torch.Tensor, vocab_size: int | None = None, name: str = "input_ids") -> None:
    """Raise unless `ids` are integer token ids in `[0, vocab_size)`: not floats (embeddings, masks, logits), not
    negative, not beyond the model's vocabulary.

    Raises:
        TypeError: `ids` is not an integer tensor.
        ValueError: an id outside the vocabulary (the message gives the offending id and the vocabulary size).
    """
    import torch

    integer = isinstance(ids, torch.Tensor) and ids.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    if not integer:
        kind = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(
            f"`{name}` must be integer token ids (torch.long), e.g. from the tokenizer or make_token_windows(); got "
            f"{kind}."
        )
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ValueError(f"`{name}` holds the negative token id {low}; token ids start at 0.")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(
            f"`{name}` holds token id {high}, beyond the model's vocabulary of {vocab_size} tokens (ids 0.."
            f"{vocab_size - 1}); tokenize with the model's own tokenizer."
        )

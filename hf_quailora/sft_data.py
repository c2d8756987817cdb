"""Moved to `hf_quailora.scripts.sft_data`; this path keeps older imports working."""

from .scripts.sft_data import *  # noqa: F401,F403

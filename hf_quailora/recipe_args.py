"""Moved to `hf_quailora.scripts.args`; this path keeps older imports working."""

from .scripts.args import *  # noqa: F401,F403

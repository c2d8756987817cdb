"""`dynamic_rank.json`: the file beside a saved adapter that marks it as dynamic-rank and records its scaling.

`DynamicRankTrainer.save_model` writes it; the lm-eval bridge, the `hf-dynrank` model and the CLI read it, so that
an adapter is truncated with the scaling it was trained with. Without it an adapter is treated as an ordinary
fixed-rank LoRA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


DYNAMIC_RANK_METADATA = "dynamic_rank.json"


def write_dynamic_rank_metadata(
    output_dir: str | os.PathLike, min_rank: int, max_rank: int, rank_scaling: str = "per_rank", **extra
) -> str:
    """Write `dynamic_rank.json` beside a saved adapter: it marks the adapter as dynamic-rank for the bridge/CLI."""
    path = Path(output_dir) / DYNAMIC_RANK_METADATA
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"min_rank": int(min_rank), "max_rank": int(max_rank), "rank_scaling": rank_scaling, **extra}
    path.write_text(json.dumps(payload, indent=1))
    return str(path)


def read_dynamic_rank_metadata(adapter_dir: str | os.PathLike) -> dict | None:
    """The `dynamic_rank.json` a `DynamicRankTrainer` writes beside its adapter (`None` if absent)."""
    path = Path(adapter_dir) / DYNAMIC_RANK_METADATA
    return json.loads(path.read_text()) if path.is_file() else None

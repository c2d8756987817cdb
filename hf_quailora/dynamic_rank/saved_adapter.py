"""Saved adapters, read and checked before any model loads: `adapter_config.json` and `dynamic_rank.json`.

Every loader (`load_dynamic_rank_adapter`, `hf-quailora eval|export`, `hf-dynrank`) calls `read_saved_adapter`
first, so that a wrong folder, a broken file or an impossible rank fails in a moment, not after the base model has
loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .._io_utils import ADAPTER_CONFIG, read_json_object
from .._peft_utils import CONFIG_FACTS_KEY
from .spec import METADATA_FILE, DynamicRankMetadata


class SavedAdapter(NamedTuple):
    """What `read_saved_adapter` finds in an adapter folder."""

    path: str
    lora_rank: int  # the LoRA r of adapter_config.json (the smallest, with a rank_pattern)
    metadata: DynamicRankMetadata | None

    @property
    def max_rank(self) -> int:
        """The largest rank trained: `max_rank` of `dynamic_rank.json`, else the LoRA r (a plain adapter)."""
        return self.metadata.max_rank if self.metadata is not None else self.lora_rank


def _adapter_subfolders(folder: Path) -> list[str]:
    return sorted(str(p.parent) for p in folder.glob(f"*/{ADAPTER_CONFIG}"))[:3]


def _read_adapter_config(folder: Path) -> dict:
    if not folder.exists():
        raise ValueError(f"Adapter folder {folder} does not exist; give the folder that save_model() or "
                         "export_rank() wrote.")
    if not folder.is_dir():
        raise ValueError(f"Adapter {folder} is a file; give the folder that save_model() or export_rank() wrote.")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        inside = _adapter_subfolders(folder)
        hint = f" Adapters inside it: {', '.join(inside)}." if inside else ""
        raise ValueError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a saved peft adapter.{hint}")
    return read_json_object(path, "Save the adapter again.")


def _metadata_from_config(config: dict, folder: Path) -> DynamicRankMetadata | None:
    """A QuAILoRA adapter saved without `dynamic_rank.json` (a launcher's own save, e.g. LLaMA-Factory's, of a
    `hf-quailora init` start): its LoraConfig's `auto_mapping` still carries the facts (`hf_quailora/_peft_utils.py`)
    but not the base quantization, which then must be given (`docs/launchers.md`)."""
    facts = (config.get("auto_mapping") or {}).get(CONFIG_FACTS_KEY)
    if not isinstance(facts, dict) or facts.get("quailora") is not True:
        return None
    keys = ("max_rank", "min_rank", "rank_scaling", "update_rule")
    try:
        return DynamicRankMetadata(quailora=True, **{key: facts[key] for key in keys if key in facts})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / ADAPTER_CONFIG} holds malformed hf_quailora facts in `auto_mapping` "
                         f"({error}); save the adapter again.") from error


def read_saved_adapter(adapter_dir: str | os.PathLike) -> SavedAdapter:
    """Read and check an adapter folder (`adapter_config.json`, `dynamic_rank.json`) without loading any model.

    Without `dynamic_rank.json`, a QuAILoRA adapter's metadata comes from the facts its `adapter_config.json`
    carries (`auto_mapping["hf_quailora"]`), with no base quantization recorded: the loaders then ask for one.

    Every loader calls this first, so that a wrong folder, a broken file or an impossible rank fails in a moment,
    not after the base model has loaded.

    Raises:
        TypeError: `adapter_dir` is not a path.
        ValueError: no such folder, no `adapter_config.json`, not a LoRA adapter (or a DoRA one), a broken
            `dynamic_rank.json`, or one whose `max_rank` exceeds the LoRA r.

    Example:

    ```python
    saved = read_saved_adapter("outputs/alpaca/adapter")
    saved.max_rank, saved.metadata.quantization  # (16, 'nf4')
    ```
    """
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise TypeError(f"The adapter must be a folder path; got {type(adapter_dir).__name__}.")
    folder = Path(adapter_dir).expanduser()
    config = _read_adapter_config(folder)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')!r} adapter; dynamic rank needs a LoRA adapter.")
    if config.get("use_dora"):
        raise ValueError(f"{folder} holds a DoRA adapter; dynamic rank supports plain LoRA only.")
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"{folder / ADAPTER_CONFIG} holds LoRA ranks {ranks}; they must be positive integers.")
    metadata = DynamicRankMetadata.load(folder) or _metadata_from_config(config, folder)
    if metadata is not None and metadata.max_rank > min(ranks):
        raise ValueError(
            f"{folder / METADATA_FILE} records max_rank {metadata.max_rank}, above the adapter's LoRA r "
            f"{min(ranks)}: the two files do not belong together. Save the adapter again."
        )
    return SavedAdapter(str(folder), min(ranks), metadata)

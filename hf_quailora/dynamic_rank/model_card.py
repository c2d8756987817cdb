"""The model card section every adapter folder hf_quailora writes carries: which base it belongs to, how to load it,
and why a QuAILoRA adapter must not be merged into the full-precision base (docs/methods.md §9).

peft writes a README.md (a model card) beside every adapter it saves, and trl writes its own into the trainer's
`output_dir`; `write_adapter_card` keeps what is there and adds (or replaces) one section between two markers.

Example:

```python
write_adapter_card("outputs/adapter", DynamicRankMetadata.load("outputs/adapter"))
```
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .spec import DynamicRankMetadata


CARD_FILE = "README.md"
CARD_START = "<!-- hf_quailora: deployment -->"
CARD_END = "<!-- /hf_quailora: deployment -->"


def _quailora_warning(quantization: str) -> str:
    return (
        f"**Do not attach it to, or merge it into, the full-precision base.** QuAILoRA initialised this adapter so "
        f"that s·B·A ≈ W − Q: it corrects the {quantization} weights Q towards the full-precision W. On W itself the "
        "correction is applied twice. On SmolLM2-135M (held-out Wikipedia perplexity), the full-precision base "
        "alone scores 28.4, the NF4 base 35.5, the NF4 base + the QuAILoRA start 30.3, and the same adapter on (or "
        "`merge_and_unload`-ed into) the full-precision base 34.2; a trained adapter on the full-precision base "
        "scored worse than that base alone. peft's `PeftModel.from_pretrained` does not read `dynamic_rank.json`, "
        "so it cannot stop this: load the base as below.\n"
    )


def adapter_card_section(metadata: DynamicRankMetadata) -> str:
    """The section's Markdown (between the markers) for an adapter described by `metadata`."""
    quantization = metadata.quantization or "none"
    rank = metadata.exported_rank or metadata.max_rank
    lines = [CARD_START, "", "## Deployment (hf_quailora)", ""]
    kind = "QuAILoRA-initialised dynamic-rank" if metadata.quailora else "dynamic-rank"
    lines.append(f"This is a {kind} LoRA adapter (ranks {metadata.min_rank}..{metadata.max_rank}, "
                 f"`{metadata.rank_scaling}` scaling), trained on a **{quantization}** base "
                 "(recorded in `dynamic_rank.json`).\n")
    if metadata.quailora and quantization != "none":
        lines.append(_quailora_warning(quantization))
    lines += [
        f"Load it on the base it was trained on ({quantization}):", "", "```python",
        "from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter", "",
        'model, tokenizer, *_ = load_dynamic_rank_adapter("<base model>", "<this folder>")', "```", "",
    ]
    if quantization != "none":
        lines += [
            f"To serve without peft or bitsandbytes, merge rank b into the dequantized {quantization} weights "
            "(exact: Q + s·B·A), which gives a plain transformers model folder:", "", "```bash",
            f"hf-quailora export --merged --rank {rank} --dtype bfloat16 --model <base model> --adapter <this folder> "
            "--output_dir merged", "```", "",
        ]
    lines += ["See docs/deployment.md of hf_quailora.", "", CARD_END, ""]
    return "\n".join(lines)


def carry_card(target: str | os.PathLike, staged: str | os.PathLike) -> None:
    """Copy the README.md already in `target` (trl's card, the user's notes) into the `staged` folder that will
    replace it, so that what is written there next updates it instead of replacing it."""
    card = Path(target) / CARD_FILE
    if card.is_file():
        shutil.copy2(card, Path(staged) / CARD_FILE)


def write_adapter_card(folder: str | os.PathLike, metadata: DynamicRankMetadata) -> str:
    """Add the deployment section to `folder/README.md`, keeping the rest of an existing card; return its path.

    A section written earlier (between `CARD_START` and `CARD_END`) is replaced, so writing twice leaves one.

    Example:

    ```python
    with staged_folder(output_dir) as tmp:
        model.save_pretrained(tmp)
        write_adapter_card(tmp, metadata)
    ```
    """
    path = Path(folder) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start != -1 and end > start:
        text = text[:start] + text[end + len(CARD_END) :].lstrip("\n")
    text = text.rstrip("\n")
    text = f"{text}\n\n{adapter_card_section(metadata)}" if text else adapter_card_section(metadata)
    path.write_text(text, encoding="utf-8")
    return str(path)


__all__ = ["CARD_FILE", "adapter_card_section", "carry_card", "write_adapter_card"]

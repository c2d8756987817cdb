"""What the benchmarks share: the LoRA model they measure, the headline metric, and how they write results.

- `peft_model` (and `lora_config`): a base model, loaded by name in a quantization or given, with a fresh LoRA.
- `gap_closed` and `format_gap`: the fraction of the QLoRA → LLM.int8 gap a start closes, and its table cell.
- `write_results`, `write_json`, `write_text`, `write_file`: result files written atomically (`hf_quailora.io`),
  so that an interrupted run never leaves half a table or a JSON file that does not parse.

Modules imported as part of the `bench` package (the tests, `python -m bench.compare_init`) import this one as
`._common` (`.._common` from `bench.compare_init`); a script run as `python bench/<script>.py` has `bench/` itself
on `sys.path` and imports it as `_common`. hf_quailora, torch and peft are imported where they are used: importing
`gap_closed` imports no torch.
"""

from __future__ import annotations

import json
import math
import os


def lora_config(rank: int, alpha: int | None = None, target_modules: str | list[str] = "all-linear",
                dropout: float = 0.0, **kwargs):
    """A peft `LoraConfig` with `r = rank` and `lora_alpha = alpha` (default: the rank, so the scale α / r is 1).

    `target_modules` is `"all-linear"`, a comma-separated string of module names (as on the scripts' command lines)
    or a list of names; `kwargs` go to `LoraConfig` as they are (`task_type`, `init_lora_weights`, ...).
    """
    from peft import LoraConfig

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=target_modules,
                      lora_dropout=dropout, **kwargs)


def peft_model(model, quantization: str = "nf4", *, rank: int, alpha: int | None = None,
               target_modules: str | list[str] = "all-linear", dropout: float = 0.0, seed: int | None = None,
               adapter_name: str = "default", **lora_kwargs):
    """A base model with a fresh LoRA adapter, as every benchmark measures it.

    Args:
        model (`str` or `PreTrainedModel`): a loaded base, or an embedded name, folder or Hub id loaded by
            `hf_quailora.load_quantized_model` in `quantization` (load it yourself when you need the tokenizer).
        quantization (`str`, defaults to `"nf4"`): the base's quantization when `model` is a name; else unused.
        rank, alpha, target_modules, dropout: the adapter (`lora_config`; `alpha` defaults to the rank).
        seed (`int`, *optional*): `torch.manual_seed(seed)` right before the adapter is made, so that runs with the
            same seed draw the same random A; `None` leaves the global generator as it is.
        adapter_name (`str`, defaults to `"default"`): the adapter's name in the `PeftModel`.
        lora_kwargs: more `LoraConfig` arguments (`task_type`, `init_lora_weights`, ...).

    Returns:
        `peft.PeftModel`: the base with the adapter (B = 0 unless `init_lora_weights` says otherwise).
    """
    import torch
    from peft import get_peft_model

    if isinstance(model, (str, os.PathLike)):
        from hf_quailora import load_quantized_model

        model, _ = load_quantized_model(model, quantization)
    if seed is not None:
        torch.manual_seed(seed)
    config = lora_config(rank, alpha, target_modules, dropout, **lora_kwargs)
    return get_peft_model(model, config, adapter_name=adapter_name)


def gap_closed(qlora: float | None, value: float | None, int8: float | None) -> float | None:
    """The fraction of the QLoRA → int8 gap that `value` closes: `(qlora − value) / (qlora − int8)`.

    The benchmarks' headline metric, for any lower-is-better measure (perplexity, loss): 0 at QLoRA's start (the
    NF4 base with B = 0), 1 at the LLM.int8 base, negative for a start worse than QLoRA's, above 1 for one better
    than int8. The sign follows the gap, so a reference above QLoRA gives the same fractions.

    Args:
        qlora (`float`, *optional*): the QLoRA (NF4, B = 0) value.
        value (`float`, *optional*): the value of the start or arm being measured.
        int8 (`float`, *optional*): the reference's (LLM.int8, B = 0) value.

    Returns:
        `float` or `None`: the fraction; `None` when it is undefined: a zero gap (`qlora == int8`, decided once
        here for every benchmark), or a missing (`None`) or non-finite value. Never nan or inf, so JSON stays valid
        (`null`) and tables print a mark (`format_gap`), not a number.

    Example:

    ```python
    >>> gap_closed(40.0, 35.0, 30.0)
    0.5
    >>> gap_closed(40.0, 35.0, 40.0) is None
    True
    ```
    """
    values = (qlora, value, int8)
    if any(v is None or not math.isfinite(v) for v in values) or qlora == int8:
        return None
    return (qlora - value) / (qlora - int8)


def format_gap(gap: float | None, missing: str = "n/a") -> str:
    """A gap closed as a table cell: `"55.7%"`, or `missing` where `gap_closed` returned `None`."""
    return missing if gap is None else f"{gap:.1%}"


def write_file(path: str, write) -> str:
    """`write(temporary_path)`, then one rename to `path` (`hf_quailora.io.write_file_atomically`), its folder
    created first; returns `path`. The temporary file keeps `path`'s suffix, so `savefig` picks the format."""
    from hf_quailora.io import write_file_atomically

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return write_file_atomically(path, write)


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` atomically (`write_file`); returns `path`."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename publishes it

    return write_file(path, write)


def write_json(path: str, record) -> str:
    """Write `record` to `path` as JSON (indent 1, the format of every file in bench/results), atomically."""
    return write_text(path, json.dumps(record, indent=1))


def write_results(stem: str, markdown: str, record) -> tuple[str, str]:
    """A benchmark's table and data: `markdown` to `stem.md` and `record` to `stem.json`, each atomically."""
    return write_text(stem + ".md", markdown), write_json(stem + ".json", record)


def status_bytes(field: str) -> int:
    """A byte count from this process's `/proc/self/status` (e.g. `"VmHWM"`, the peak RSS)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

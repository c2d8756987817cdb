"""The `quailora:` and `dynamic_rank:` blocks of an axolotl YAML, checked inside axolotl's own config validation.

`QuAILoRAPlugin.get_input_args` names `QuAILoRAArgs`; axolotl merges it into its `AxolotlInputConfig` (as it does
for every plugin's arguments), so a bad block fails `axolotl train config.yml` (and `load_cfg`) before any model
loads. The blocks are parsed by the library's own classes, never re-declared here: `quailora:` by `QuAILoRAConfig`,
`dynamic_rank:` by `DynamicRankSettings`. This module needs pydantic (which axolotl brings), not axolotl.

Example:

```python
from hf_quailora.integrations.axolotl.args import QuAILoRAArgs

QuAILoRAArgs(quailora={"calibration_samples": 64}, dynamic_rank=True).dynamic_rank  # {}: every default
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from ...dynamic_rank.mixin import DynamicRankSettings
from ...quailora.config import QuAILoRAConfig


# `quailora:` keys beside QuAILoRAConfig's fields: what QuAILoRAInitCallback takes besides its config
QUAILORA_KEYS = ("calibration_dataset", "full_precision_weights", "report_file")
# `dynamic_rank:` keys: DynamicRankSettings' fields less `seed` (axolotl's own `seed` is the fallback of `rank_seed`)
DYNAMIC_RANK_KEYS = tuple(f.name for f in dataclasses.fields(DynamicRankSettings) if f.name != "seed")
# axolotl's fused LoRA kernels compute the LoRA path inside their own autograd functions, around the peft layers'
# forward: truncation (`use_rank`) and the calibration hooks would not see them. axolotl turns them on when unset.
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# peft initialisations that change the base weights or are themselves a start QuAILoRA would overwrite
_OTHER_INITS = ("pissa", "olora", "loftq", "corda", "eva", "orthogonal")


def _as_block(name: str, value: Any) -> dict | None:
    """`true` → `{}` (every default), `false`/`null` → `None` (off), a mapping → a dict; anything else is refused."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"`{name}:` must be a mapping of settings, `true` (every default) or `false`; got {value!r}."
        )
    return dict(value)


def _check_keys(name: str, block: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ValueError(f"`{name}:` has unknown keys {unknown}; it takes {sorted(allowed)}.")


def parse_quailora_block(value: Any) -> dict | None:
    """The `quailora:` block, checked by `QuAILoRAConfig` itself; `None` when QuAILoRA is off.

    Args:
        value: the block as YAML gives it: a mapping of `QuAILoRAConfig` fields plus `calibration_dataset` (an
            embedded name, a local file or a Hub id; `None`: the trainer's train batches), `full_precision_weights`
            and `report_file` (as `QuAILoRAInitCallback` takes them); `true` for every default; `false`/`null`: off.

    Returns:
        `dict` or `None`: the block.

    Raises:
        ValueError: an unknown key, or a value `QuAILoRAConfig` refuses (its message, naming the field).

    Example: `parse_quailora_block({"solver": "als", "calibration_samples": 32})`.
    """
    block = _as_block("quailora", value)
    if block is None:
        return None
    fields = tuple(f.name for f in dataclasses.fields(QuAILoRAConfig))
    _check_keys("quailora", block, fields + QUAILORA_KEYS)
    try:
        QuAILoRAConfig(**{key: block[key] for key in fields if key in block})
    except TypeError as error:  # pydantic reports ValueErrors only: keep the message, name the block
        raise ValueError(f"`quailora:` {error}") from error
    for key in QUAILORA_KEYS:
        if block.get(key) is not None and not isinstance(block[key], str):
            raise ValueError(f"`quailora.{key}` must be a string (a name or a path); got {block[key]!r}.")
    return block


def parse_dynamic_rank_block(value: Any) -> dict | None:
    """The `dynamic_rank:` block, checked by `DynamicRankSettings` itself; `None` when dynamic rank is off.

    Args:
        value: a mapping of `DynamicRankSettings` fields (`min_rank`, `max_rank`, `rank_distribution`, `update_rule`,
            `rank_scaling`, `eval_ranks`, ...; not `seed`: axolotl's `seed` is used when `rank_seed` is unset);
            `true` for every default; `false`/`null`: off.

    Returns:
        `dict` or `None`: the block.

    Raises:
        ValueError: an unknown key, or a value `DynamicRankSettings` refuses (its message, naming the field).

    Example: `parse_dynamic_rank_block({"min_rank": 2, "eval_ranks": [2, 8]})`.
    """
    block = _as_block("dynamic_rank", value)
    if block is None:
        return None
    _check_keys("dynamic_rank", block, DYNAMIC_RANK_KEYS)
    try:
        DynamicRankSettings(**block)
    except TypeError as error:
        raise ValueError(f"`dynamic_rank:` {error}") from error
    return block


def _blocks_on(data) -> str | None:
    """The blocks that are on, for messages (`"`quailora:` and `dynamic_rank:`"`); `None` when none is."""
    names = [f"`{name}:`" for name in ("quailora", "dynamic_rank") if data.get(name) not in (None, False)]
    return " and ".join(names) or None


def turn_off_lora_kernels(cfg) -> list[str]:
    """Set axolotl's unset `lora_*_kernel` options to `false` in the raw config `cfg` when a block is on.

    axolotl turns its fused LoRA kernels on while every one of them is unset, inside its config validation, before
    `QuAILoRAArgs` can tell an unset option from a `true`; so `QuAILoRAPlugin.register` calls this on the config as
    the YAML gives it (axolotl registers plugins before validating). An explicit `true` stays, and validation
    refuses it.

    Args:
        cfg (`dict`): the unvalidated axolotl config; changed in place.

    Returns:
        `list[str]`: the options set to `false`.

    Example: `turn_off_lora_kernels({"dynamic_rank": True})` → `["lora_mlp_kernel", ...]`.
    """
    if _blocks_on(cfg) is None:
        return []
    unset = [kernel for kernel in LORA_KERNELS if cfg.get(kernel) is None]
    for kernel in unset:
        cfg[kernel] = False
    return unset


def check_blocks_with_config(data: dict) -> None:
    """Refuse axolotl settings that the blocks cannot run with.

    Args:
        data (`dict`): the whole axolotl config, before axolotl's own defaults (a `before` model validator).

    Raises:
        ValueError: a block without `adapter: lora|qlora`; `quailora:` with `lora_model_dir` (that adapter is already
            the start), with another LoRA initialisation (`peft_init_lora_weights: pissa|...`,
            `peft.loftq_config`); `dynamic_rank:` with `rl:` (only the supervised builder takes the trainer); a fused
            LoRA kernel (`lora_*_kernel: true`) with either block.
    """
    quailora, dynamic_rank, blocks = data.get("quailora"), data.get("dynamic_rank"), _blocks_on(data)
    if blocks is None:
        return
    need = "need" if " and " in blocks else "needs"
    if data.get("adapter") not in ("lora", "qlora"):
        raise ValueError(f"{blocks} {need} `adapter: lora` or `adapter: qlora`; got adapter {data.get('adapter')!r}.")
    if quailora not in (None, False):
        if data.get("lora_model_dir"):
            raise ValueError(
                f"`quailora:` would overwrite the adapter loaded from `lora_model_dir` ({data['lora_model_dir']!r}). "
                "An adapter written by `hf-quailora init` already is the QuAILoRA start: remove the `quailora:` block "
                "(its rank scaling, 'constant', is read from the adapter)."
            )
        init = data.get("peft_init_lora_weights")
        loftq = (data.get("peft") or {}).get("loftq_config")
        other = "peft.loftq_config" if loftq else f"peft_init_lora_weights: {init}"
        if (isinstance(init, str) and init.lower() in _OTHER_INITS) or loftq:
            raise ValueError(
                f"`quailora:` sets the LoRA start itself; remove `{other}` (PiSSA and OLoRA also change the base "
                "weights that QuAILoRA calibrates against)."
            )
    if dynamic_rank not in (None, False) and data.get("rl"):
        raise ValueError(f"`dynamic_rank:` trains with supervised fine-tuning only; remove it or `rl: {data['rl']}`.")
    for kernel in LORA_KERNELS:
        if data.get(kernel):
            raise ValueError(
                f"`{kernel}: true` computes LoRA outside peft's layers, which {blocks} {need} (rank truncation, "
                f"calibration hooks); set `{kernel}: false` or leave it out (the plugin then sets it to false)."
            )


class QuAILoRAArgs(BaseModel):
    """The plugin's YAML blocks, merged by axolotl into its config model (`get_input_args`).

    Parameters:
        quailora (`dict` or `bool`, *optional*): QuAILoRA initialisation before the first optimizer step
            (`parse_quailora_block`); `true` for every default. Off when absent.
        dynamic_rank (`dict` or `bool`, *optional*): dynamic-rank training, one LoRA rank per optimizer step
            (`parse_dynamic_rank_block`); `true` for every default. Off when absent.

    Raises:
        pydantic.ValidationError (a `ValueError`): a bad block, or one that the rest of the config rules out
            (`check_blocks_with_config`).

    Example: `QuAILoRAArgs(quailora={"solver": "als"})`.
    """

    quailora: dict[str, Any] | bool | None = Field(
        default=None,
        json_schema_extra={"description": "QuAILoRA initialisation (QuAILoRAConfig's fields, calibration_dataset)."},
    )
    dynamic_rank: dict[str, Any] | bool | None = Field(
        default=None,
        json_schema_extra={"description": "Dynamic-rank LoRA training (DynamicRankSettings' fields)."},
    )

    @field_validator("quailora", mode="before")
    @classmethod
    def _parse_quailora(cls, value):
        return parse_quailora_block(value)

    @field_validator("dynamic_rank", mode="before")
    @classmethod
    def _parse_dynamic_rank(cls, value):
        return parse_dynamic_rank_block(value)

    @model_validator(mode="before")
    @classmethod
    def _check_with_config(cls, data):
        if isinstance(data, dict):
            check_blocks_with_config(data)
        return data

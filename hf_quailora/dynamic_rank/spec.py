"""The vocabulary of dynamic rank, defined once: option choices, rank checks, scalings and `dynamic_rank.json`.

Every entry point (`use_rank`, `export_rank`, `evaluate_ranks`, `DynamicRankConfig`, the trainer, the CLI, the
recipes) takes its choice lists, its defaults and its rank checks from here, so they cannot drift apart.

Scaling at rank b (methods.md §2):

| `rank_scaling` | scaling at b | used by |
|---|---|---|
| `"per_rank"` | `α / b` | DyLoRA (Valipour et al. 2023); the default without QuAILoRA |
| `"constant"` | peft's `α / r` (`α / √r` with rsLoRA) at every b | QuAILoRA starts: its sorted components stay optimal |
| `"rslora"` | `α / √b` | rank-stabilised scaling |

Example:

```python
from hf_quailora.dynamic_rank.spec import DynamicRankMetadata, check_ranks

check_ranks([1, 4, 16], low=1, high=16, name="eval_ranks")
metadata = DynamicRankMetadata.load("outputs/alpaca/adapter")  # None when the adapter is not dynamic-rank
```
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from .._io_utils import read_json_object
from .._peft_utils import adapter_facts, require_lora_layers
from ..quailora import QuAILoRAInitCallback


UpdateRule = Literal["frozen", "nested"]
RankScaling = Literal["per_rank", "constant", "rslora"]
RankDistribution = Literal["uniform", "weighted"]
UPDATE_RULES: tuple[str, ...] = get_args(UpdateRule)
RANK_SCALINGS: tuple[str, ...] = get_args(RankScaling)
RANK_DISTRIBUTIONS: tuple[str, ...] = get_args(RankDistribution)
DEFAULT_UPDATE_RULE = "frozen"  # DyLoRA's rule (Valipour et al. 2023)
DEFAULT_RANK_SCALING = "per_rank"  # DyLoRA's α/b, without QuAILoRA
QUAILORA_RANK_SCALING = "constant"  # with QuAILoRA: every truncation starts at its own calibrated optimum
METADATA_FILE = "dynamic_rank.json"


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """Raise a `ValueError` naming the option unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")


def check_integer(name: str, value) -> None:
    """Raise a `TypeError` naming the option unless `value` is an `int` (not a `bool`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer; got {value!r} ({type(value).__name__}).")


def check_rank_range(min_rank, max_rank) -> None:
    """Raise a `TypeError`/`ValueError` naming the field unless `1 ≤ min_rank ≤ max_rank` are integers."""
    check_integer("min_rank", min_rank)
    check_integer("max_rank", max_rank)
    if min_rank < 1:
        raise ValueError(f"`min_rank` ({min_rank}) must be at least 1.")
    if min_rank > max_rank:
        raise ValueError(f"`min_rank` ({min_rank}) exceeds `max_rank` ({max_rank}); lower one or raise the other.")


def check_ranks(ranks: Sequence[int], low: int, high: int, name: str, range_name: str = "the allowed range") -> None:
    """Raise unless every rank is an integer in `[low, high]`; the message names the option and the bad rank.

    Example:

    ```python
    check_ranks([1, 12], 1, 8, "eval_ranks", "this adapter's range")  # ValueError: `eval_ranks` holds rank 12, ...
    ```
    """
    for b in ranks:
        check_integer(name, b)
        if not low <= b <= high:
            raise ValueError(
                f"`{name}` holds rank {b}, outside {range_name} {low}..{high}; choose ranks in it or change the range."
            )


def check_weighted_ranks(choices, weights, min_rank, max_rank, choices_name, weights_name):
    """Validate a list of distinct ranks and its weights; return them as lists. `weights=None` means equal weights."""
    if choices is None or len(choices) == 0:
        raise ValueError(f"`{choices_name}` must be a non-empty list of ranks; got {choices!r}.")
    choices = list(choices)
    check_ranks(choices, min_rank, max_rank, choices_name)
    if len(set(choices)) != len(choices):
        raise ValueError(f"`{choices_name}` ({choices}) repeats a rank; give each rank once.")
    weights = [1.0] * len(choices) if weights is None else list(weights)
    if len(weights) != len(choices):
        raise ValueError(
            f"`{weights_name}` has {len(weights)} entries but `{choices_name}` has {len(choices)}; "
            "give one weight per rank."
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"`{weights_name}` must hold positive finite numbers; got {w!r} in {weights}.")
    return choices, weights


def check_uniform_ranks(choices, weights) -> None:
    """`rank_choices` / `rank_weights` only make sense with the weighted distribution."""
    if choices is not None or weights is not None:
        raise ValueError(
            "`rank_choices`/`rank_weights` are only used with rank_distribution='weighted'; got "
            f"rank_choices={choices!r}, rank_weights={weights!r}. Set rank_distribution='weighted' or drop them."
        )


def check_rank_sampling(min_rank, max_rank, distribution, choices, weights) -> None:
    """The checks of a rank distribution, in one place for `DynamicRankConfig` and `RankSampler`.

    Raises:
        TypeError / ValueError: `1 ≤ min_rank ≤ max_rank` fails, an unknown `rank_distribution`, `rank_choices` /
            `rank_weights` given with the uniform distribution, or bad ones with the weighted one, naming the field.
    """
    check_rank_range(min_rank, max_rank)
    check_choice("rank_distribution", distribution, RANK_DISTRIBUTIONS)
    if distribution == "weighted":
        check_weighted_ranks(choices, weights, min_rank, max_rank, "rank_choices", "rank_weights")
    else:
        check_uniform_ranks(choices, weights)


def check_rank_settings(config, lora_r: int) -> int:
    """The largest rank of training (`config.max_rank`, else `lora_r`), after checking every rank of a
    `DynamicRankConfig` against it; the trainer checks the model's LoRA r, the recipes the `lora_r` they will use.

    Raises:
        ValueError: `max_rank` above the LoRA r, `min_rank` above `max_rank`, or a rank of `rank_choices`,
            `soft_ranks` or `eval_ranks` outside the range, naming the field.
    """
    if config.max_rank is not None and config.max_rank > lora_r:
        raise ValueError(
            f"`max_rank` ({config.max_rank}) exceeds the LoRA r of the model ({lora_r}); lower `max_rank` or raise "
            "`r` in the LoraConfig."
        )
    max_rank = config.max_rank if config.max_rank is not None else lora_r
    if config.min_rank > max_rank:
        raise ValueError(
            f"`min_rank` ({config.min_rank}) exceeds `max_rank` ({max_rank}, the LoRA r); lower one or raise the "
            "other."
        )
    for field_name in ("rank_choices", "soft_ranks", "eval_ranks"):
        low = 1 if field_name == "eval_ranks" else config.min_rank
        check_ranks(getattr(config, field_name) or [], low, max_rank, field_name,
                    "the model's range (max_rank = the LoRA r unless set)")
    return max_rank


def parse_ranks(ranks: str | Sequence[int]) -> list[int]:
    """`"1,2,4"` or `[1, 2, 4]` → `[1, 2, 4]` (sorted, unique); raises `ValueError` on anything else."""
    if isinstance(ranks, str):
        try:
            ranks = [int(part) for part in ranks.split(",") if part.strip()]
        except ValueError as err:
            raise ValueError(f"Ranks must be comma-separated integers like '1,2,4,8'; got {ranks!r}.") from err
    if not ranks or not all(isinstance(b, int) and not isinstance(b, bool) for b in ranks):
        raise ValueError(f"Give at least one integer rank; got {ranks!r}.")
    return sorted(set(ranks))


def default_eval_ranks(min_rank: int, max_rank: int) -> list[int]:
    """`min_rank`, the powers of two strictly between, and `max_rank`."""
    ranks = {min_rank, max_rank}
    power = 1
    while power < max_rank:
        if power > min_rank:
            ranks.add(power)
        power *= 2
    return sorted(ranks)


# ---------------------------------------------------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------------------------------------------------


def rank_scaling_for(layer, adapter_name: str, b: int, rank_scaling: str) -> float:
    """The LoRA scaling of a peft `LoraLayer` at rank `b` (see the table at the top of this module)."""
    alpha = layer.lora_alpha[adapter_name]
    if rank_scaling == "per_rank":
        return alpha / b  # DyLoRA, Valipour et al. 2023: scaling α / b at rank b
    if rank_scaling == "rslora":
        return alpha / math.sqrt(b)
    if rank_scaling == "constant":
        r = layer.r[adapter_name]
        return alpha / math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else alpha / r
    raise ValueError(f"`rank_scaling` must be one of {RANK_SCALINGS}; got {rank_scaling!r}.")


def quailora_will_initialise(callbacks: Sequence) -> bool:
    """Whether a trainer's callbacks include a `QuAILoRAInitCallback` (QuAILoRA then initialises at train begin)."""
    return any(isinstance(callback, QuAILoRAInitCallback) for callback in callbacks)


def resolve_rank_scaling(
    model, rank_scaling: str | None = None, adapter_name: str = "default", callbacks: Sequence | None = None
) -> str:
    """The scaling at truncated ranks, decided here only (`use_rank`, `export_rank`, the adapter loader,
    `evaluate_ranks` and `DynamicRankTrainer` ask).

    In order: the explicit `rank_scaling`; `"constant"` when a `QuAILoRAInitCallback` among a trainer's `callbacks`
    will initialise the adapter; the scaling recorded for the adapter (by a trainer or the loader); `"constant"` for
    an adapter that `quailora_init` initialised (its sorted components are optimal at every rank); else DyLoRA's
    `"per_rank"`. The QuAILoRA default was `"per_rank"` up to hf_quailora 0.1, so outside a trainer it warns.

    Args:
        model (`nn.Module`): the model holding the adapter.
        rank_scaling (`str`, *optional*): the explicit choice, one of `RANK_SCALINGS`.
        adapter_name (`str`, defaults to `"default"`).
        callbacks (`list`, *optional*): a trainer's callbacks, when a trainer asks (it logs its choice instead of
            a warning); `None` otherwise.

    Returns:
        `str`: one of `RANK_SCALINGS`.

    Raises:
        ValueError: an explicit `rank_scaling` that is not one of `RANK_SCALINGS`.

    Example: `resolve_rank_scaling(model)` is `'constant'` after `quailora_init(model, ...)`, else `'per_rank'`.
    """
    if rank_scaling is not None:
        check_choice("rank_scaling", rank_scaling, RANK_SCALINGS)
        return rank_scaling
    if quailora_will_initialise(callbacks or ()):
        return QUAILORA_RANK_SCALING
    facts = adapter_facts(model, adapter_name)
    if facts.get("rank_scaling") is not None:
        return facts["rank_scaling"]
    if not facts.get("quailora"):
        return DEFAULT_RANK_SCALING
    if callbacks is None:
        warnings.warn(
            "This adapter was initialised by QuAILoRA, so `rank_scaling` now defaults to 'constant' (it was "
            "'per_rank' up to hf_quailora 0.1). Pass `rank_scaling` explicitly to silence this warning.",
            FutureWarning,
            stacklevel=3,
        )
    return QUAILORA_RANK_SCALING


# ---------------------------------------------------------------------------------------------------------------------
# dynamic_rank.json
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DynamicRankMetadata:
    """`dynamic_rank.json`, the file beside a saved adapter that marks it as dynamic-rank.

    `DynamicRankTrainer.save_model` and `export_rank` write it, both through `DynamicRankMetadata.for_model`; the
    lm-eval model `hf-dynrank`, `hf-quailora eval` and `hf-quailora export` read it through `read_saved_adapter`,
    so that an adapter is truncated with the scaling it was trained with, only at ranks it was trained at, and
    evaluated on the base it was trained on. Without it an adapter is an ordinary fixed-rank LoRA.

    Attributes:
        max_rank (`int`): largest rank trained (for an export of rank b: b).
        min_rank (`int`, defaults to 1): smallest rank trained.
        rank_scaling (`str`): one of `RANK_SCALINGS`.
        update_rule (`str`): one of `UPDATE_RULES`.
        quantization (`str`): the quantization of the base it was trained on, one of
            `hf_quailora.quantization.recorded_quantizations()` (bitsandbytes: `"nf4"`, `"fp4"`, `"int8"`; or
            `"none"`); a QuAILoRA adapter on another base applies its correction to the wrong error.
            Required to save; `None` only when read from a file of hf_quailora 0.1, which did not record it.
        quailora (`bool`): whether QuAILoRA initialised it.
        exported_rank (`int`, *optional*): set by `export_rank`: the adapter holds the first `exported_rank`
            components of a larger one.
        exported_exit (`int`, *optional*): set by `export_rank(..., exit=k)`: layers below k only (base: k layers).
        calibration (`dict`, *optional*): a QuAILoRA start's calibration (data, samples, length, tokens, solver),
            set by `hf-quailora init`; `None` otherwise, and for files written before it existed.

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range, naming it.

    Example:

    ```python
    DynamicRankMetadata(min_rank=1, max_rank=16, rank_scaling="constant", quantization="nf4").save("adapter")
    DynamicRankMetadata.load("adapter").rank_scaling  # 'constant'
    ```
    """

    max_rank: int
    min_rank: int = 1
    rank_scaling: str = DEFAULT_RANK_SCALING
    update_rule: str = DEFAULT_UPDATE_RULE
    quantization: str | None = None
    quailora: bool = False
    exported_rank: int | None = None
    exported_exit: int | None = None
    calibration: dict | None = None

    def __post_init__(self):
        from ..quantization import recorded_quantizations

        check_rank_range(self.min_rank, self.max_rank)
        check_choice("rank_scaling", self.rank_scaling, RANK_SCALINGS)
        check_choice("update_rule", self.update_rule, UPDATE_RULES)
        if self.quantization is not None:
            check_choice("quantization", self.quantization, recorded_quantizations())
        if not isinstance(self.quailora, bool):
            raise TypeError(f"`quailora` must be true or false; got {self.quailora!r}.")
        if self.exported_rank is not None:
            check_integer("exported_rank", self.exported_rank)
            if self.exported_rank != self.max_rank:
                raise ValueError(
                    f"`exported_rank` ({self.exported_rank}) must equal `max_rank` ({self.max_rank}): an export "
                    "of rank b holds ranks 1..b."
                )
        if self.exported_exit is not None:
            check_ranks([self.exported_exit], 1, 1 << 30, "exported_exit", "layer counts")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise TypeError(f"`calibration` must be a JSON object (a dict) or null; got {self.calibration!r}.")

    @classmethod
    def for_model(cls, model, adapter_name: str = "default", **fields) -> DynamicRankMetadata:
        """The metadata of `model`'s adapter: `fields` plus what the model itself says (the one place that does).

        The base quantization is read from the LoRA layers' base layers, and `quailora` from what `quailora_init`
        recorded on the model; `fields` give `max_rank`, `min_rank`, `rank_scaling`, `update_rule` and, for an
        export, `exported_rank`.
        """
        from ..quantization import base_quantization

        layers = require_lora_layers(model, adapter_name)
        quailora = bool(adapter_facts(model, adapter_name).get("quailora", False))
        return cls(quantization=base_quantization(layers.values()), quailora=quailora, **fields)

    def save(self, adapter_dir: str | os.PathLike) -> str:
        """Write `dynamic_rank.json` into `adapter_dir`; return its path.

        Raises:
            ValueError: `quantization` is not set (every file records the base the adapter was trained on).
        """
        if self.quantization is None:
            raise ValueError(
                "Set `quantization` (the base the adapter was trained on: 'nf4', 'fp4', 'int8' or 'none') before "
                "saving; `DynamicRankMetadata.for_model(model, ...)` reads it from the model."
            )
        path = Path(adapter_dir) / METADATA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return str(path)

    @classmethod
    def load(cls, adapter_dir: str | os.PathLike) -> DynamicRankMetadata | None:
        """Read and check `dynamic_rank.json` in `adapter_dir`; `None` when there is none. Unknown keys are ignored.

        Raises:
            ValueError / TypeError: the file is not a JSON object, lacks `max_rank`, or holds a bad value; the
                message names the file and the field.
        """
        path = Path(adapter_dir) / METADATA_FILE
        if not path.is_file():
            return None
        fix = ("Write it again with save_model()/export_rank(), fix it by hand, or delete it to use the adapter as "
               "a plain fixed-rank LoRA.")
        payload = read_json_object(path, fix)
        if "rank" in payload:  # written by export_rank of hf_quailora 0.1: {"rank", "rank_scaling", "max_rank"}
            payload["exported_rank"] = payload["max_rank"] = payload.pop("rank")
        if "max_rank" not in payload:
            raise ValueError(f"{path} has no `max_rank`. {fix}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in payload.items() if key in known})
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err} {fix}") from None


def check_trained_ranks(ranks: Sequence[int], lora_rank: int, max_rank: int | None, name: str) -> None:
    """Raise unless every rank is an integer in `1..max_rank` (the trained ranks) and `1..lora_rank`.

    `max_rank` is the recorded trained maximum (`None`: the LoRA r). A rank above it gets an error naming it:
    those components were never trained.
    """
    for b in ranks:
        check_integer(name, b)
        if max_rank is not None and max_rank < b <= lora_rank:
            raise ValueError(f"`{name}` holds rank {b}, above this adapter's max_rank {max_rank}: it was trained at "
                             f"ranks up to {max_rank} only (its LoRA r is {lora_rank}), so ranks above were never "
                             f"trained. Choose ranks in 1..{max_rank}.")
    high = lora_rank if max_rank is None else min(lora_rank, max_rank)
    check_ranks(ranks, 1, high, name, "this adapter's range")

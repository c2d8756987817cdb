"""Truncation of peft's LoRA factors to a rank b: `use_rank`, for training, evaluation and inference.

References:
    - DyLoRA (Valipour et al., EACL 2023): one LoRA of rank `r_max`, a rank `b` drawn once per optimizer step,
      forward with `A[:b]`, `B[:, :b]` and scaling `α / b`; "frozen" update (only component b learns).
    - QDyLoRA (Rajabzadeh et al., EMNLP 2024 Industry): the same on a QLoRA base; all components `≤ b` learn
      ("nested" update here).
    - SoFT / SortedNet (Kavehzadeh et al., 2023): loss summed over a set of nested sub-models.

Truncation keeps peft's `lora_A[adapter]` / `lora_B[adapter]` `nn.Linear` modules and their Parameters (state-dict
keys and optimizer state are unchanged) but swaps their class to `_TruncatedLoraLinear`, whose `forward` slices the
weight: `F.linear(x, A[:b])` and `F.linear(h, B[:, :b])`, so a small rank costs only a rank-b adapter pass. peft's
`Linear`, `Linear4bit` and `Linear8bitLt` forwards all compute `lora_B(lora_A(dropout(x))) * self.scaling[adapter]`
(peft 0.21 `tuners/lora/layer.py` and `bnb.py`), so setting `scaling[adapter]` to the scaling at b completes the
truncated update `W + s_b B[:, :b] A[:b]`. Merging reads the full weights (`get_delta_weight`), so it raises while a
rank is in use.

Example:

```python
from hf_quailora import use_rank

with use_rank(peft_model, 4, rank_scaling="per_rank"):  # every LoRA layer computes W x + (α/4) B[:, :4] A[:4] x
    loss = peft_model(**batch).loss
```
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._peft_utils import adapter_facts, common_lora_rank, require_lora_layers
from .rank_mask import _MaskedLoraLinear, _refuse_merge, masked_state
from .spec import (
    UPDATE_RULES,
    RankScaling,
    UpdateRule,
    check_choice,
    check_rank_range,
    check_trained_ranks,
    rank_scaling_for,
    resolve_rank_scaling,
)


class _TruncatedLoraLinear(nn.Linear):
    """peft's `lora_A` / `lora_B` `nn.Linear`, sliced to the first `_dr_rank` components when that is set.

    `_dr_axis` is 0 for `lora_A` (rows of `A ∈ R^{r×in}`) and 1 for `lora_B` (columns of `B ∈ R^{out×r}`).
    Components with index `< _dr_frozen_below` are detached (DyLoRA's frozen update). With `_dr_rank = None` the
    module is an ordinary `nn.Linear`.
    """

    _dr_rank: int | None = None
    _dr_axis: int = 0
    _dr_frozen_below: int = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        b = self._dr_rank
        if b is None:
            return F.linear(input, self.weight, self.bias)
        weight = self.weight[:b] if self._dr_axis == 0 else self.weight[:, :b]
        k = self._dr_frozen_below
        if k > 0:  # DyLoRA "frozen": gradient only reaches components >= k (component b when k = b - 1)
            if self._dr_axis == 0:
                weight = torch.cat([weight[:k].detach(), weight[k:]], dim=0)
            else:
                weight = torch.cat([weight[:, :k].detach(), weight[:, k:]], dim=1)
        return F.linear(input, weight, self.bias)


def _innermost_linear(factor: nn.Module) -> nn.Module:
    """The `nn.Linear` inside a wrapped LoRA factor (FSDP1 wraps each factor as a `FullyShardedDataParallel` module
    holding it as `.module`); the factor itself when it is not wrapped."""
    while not isinstance(factor, nn.Linear) and isinstance(getattr(factor, "module", None), nn.Module):
        factor = factor.module
    return factor


def find_dynamic_rank_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The LoRA layers of `model` that dynamic rank supports, checked.

    Raises:
        ValueError: no LoRA layers with `adapter_name`, or a layer with DoRA / another LoRA variant, `lora_bias`,
            factors that are not `nn.Linear` (embedding or convolution LoRA), or LoRA on a parameter (peft's
            `target_parameters`: MoE routers and fused experts).
    """
    layers = require_lora_layers(model, adapter_name)
    _refuse_parameter_targets(layers)
    for name, layer in layers.items():
        if adapter_name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter_name, False):
            raise ValueError(f"{name}: dynamic rank supports plain LoRA only; DoRA and other LoRA variants are not.")
        if layer.lora_bias.get(adapter_name, False):
            raise ValueError(f"{name}: dynamic rank does not support `lora_bias=True`; set it to False.")
        for factor in (_innermost_linear(layer.lora_A[adapter_name]), _innermost_linear(layer.lora_B[adapter_name])):
            if type(factor) not in (nn.Linear, _TruncatedLoraLinear, _MaskedLoraLinear):
                raise ValueError(
                    f"{name}: dynamic rank needs `nn.Linear` LoRA factors; got {type(factor).__name__}. Exclude this "
                    "layer from `target_modules`."
                )
    return layers


def _refuse_parameter_targets(layers: dict[str, nn.Module]) -> None:
    """Refuse peft's `target_parameters` LoRA (`ParamWrapper`), naming the layers and the `target_modules` to use.

    peft applies such an adapter by adding its delta weight to the wrapped parameter inside the forward pass (a
    mixture-of-experts router's weight, or fused 3-D expert weights whose factors interleave the experts), so the
    sliced `lora_A` / `lora_B` forward that truncation relies on never runs. peft's `"all-linear"` adds these
    targets by itself on MoE models (Mixtral, Qwen2/3-MoE, OLMoE...); bitsandbytes quantizes none of them.
    """
    from peft.tuners.lora.layer import ParamWrapper

    wrapped = {name: layer for name, layer in layers.items() if isinstance(layer, ParamWrapper)}
    if not wrapped:
        return
    described = [
        f"{name.removeprefix('base_model.model.')} ({type(layer.get_base_layer()).__name__}.{layer.parameter_name})"
        for name, layer in wrapped.items()
    ]
    linear = sorted({name.rsplit(".", 1)[-1] for name in layers if name not in wrapped})
    raise ValueError(
        f"Dynamic rank cannot truncate LoRA on parameters (peft `target_parameters`, e.g. a mixture-of-experts router "
        f"or fused expert weights): {', '.join(described[:4])}{' ...' if len(described) > 4 else ''} "
        f"({len(described)} in all). peft adds them to 'all-linear' on MoE models and applies them through their "
        f"delta weight. Target the linear layers only: LoraConfig(target_modules={linear})."
    )


def lora_rank_of(model: nn.Module, adapter_name: str = "default") -> int:
    """The largest rank every LoRA layer supports (the smallest LoRA r over layers, e.g. with `rank_pattern`)."""
    return common_lora_rank(find_dynamic_rank_layers(model, adapter_name), adapter_name)


@dataclass(frozen=True)
class TrainedRanks:
    """The ranks an adapter can run at: its LoRA r and the range it was trained on, with the check of a rank.

    Every place that checks a requested rank against an adapter builds one: from a model (`use_rank`,
    `export_rank`, `evaluate_ranks`, `RankSweepCallback`) or from a saved adapter before any model loads
    (`hf-dynrank`, `hf-quailora eval|export`).

    Attributes:
        lora_rank (`int`): the LoRA r (the smallest over layers, with a `rank_pattern`).
        max_rank (`int`): the largest rank trained (`max_rank` recorded by the trainer, the loader or
            `dynamic_rank.json`); the LoRA r when nothing was recorded. Never above `lora_rank`.
        min_rank (`int`, defaults to 1): the smallest rank trained.

    Raises:
        TypeError / ValueError: not `1 ≤ min_rank ≤ max_rank ≤ lora_rank`.

    Example:

    ```python
    ranks = TrainedRanks.from_saved(read_saved_adapter("outputs/alpaca/adapter"))
    ranks.check([1, 4, 16], "--ranks")  # ValueError naming --ranks when 16 was never trained
    ```
    """

    lora_rank: int
    max_rank: int
    min_rank: int = 1

    def __post_init__(self):
        check_rank_range(self.min_rank, self.max_rank)
        if self.max_rank > self.lora_rank:
            raise ValueError(f"`max_rank` ({self.max_rank}) exceeds the LoRA r ({self.lora_rank}).")

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default", layers: dict | None = None) -> TrainedRanks:
        """The ranks of `model`'s adapter: the LoRA r of its (checked) layers and the range recorded on the model.

        Args:
            model (`nn.Module`): a model holding peft LoRA layers.
            adapter_name (`str`, defaults to `"default"`).
            layers (`dict`, *optional*): `find_dynamic_rank_layers(model, adapter_name)`, when already found.

        Raises:
            ValueError: no (supported) LoRA layers; see `find_dynamic_rank_layers`.
        """
        layers = find_dynamic_rank_layers(model, adapter_name) if layers is None else layers
        lora_rank = common_lora_rank(layers, adapter_name)
        facts = adapter_facts(model, adapter_name)
        recorded = facts.get("max_rank")
        max_rank = lora_rank if recorded is None else min(recorded, lora_rank)
        return cls(lora_rank, max_rank, min(facts.get("min_rank", 1), max_rank))

    @classmethod
    def from_saved(cls, saved) -> TrainedRanks:
        """The ranks of a saved adapter (`read_saved_adapter`'s `SavedAdapter`): the LoRA r of `adapter_config.json`
        and the range of `dynamic_rank.json` (the LoRA r alone for a plain adapter)."""
        min_rank = saved.metadata.min_rank if saved.metadata is not None else 1
        return cls(saved.lora_rank, saved.max_rank, min_rank)

    def check(self, ranks: Sequence[int], name: str) -> None:
        """Raise unless every rank is an integer in `1..max_rank`, naming the option `name` (see
        `spec.check_trained_ranks`: a rank above `max_rank` but within the LoRA r was never trained)."""
        check_trained_ranks(ranks, self.lora_rank, self.max_rank, name)


def checked_rank_layers(model: nn.Module, b, adapter_name: str = "default", name: str = "rank"):
    """The supported LoRA layers and their common LoRA r, after checking that rank `b` is within `1..r` and not
    above the recorded trained `max_rank`."""
    layers = find_dynamic_rank_layers(model, adapter_name)
    ranks = TrainedRanks.from_model(model, adapter_name, layers)
    ranks.check([b], name)
    return layers, ranks.lora_rank


def _resolve_update_rule(model: nn.Module, update_rule: str | None) -> str:
    if update_rule is not None:
        check_choice("update_rule", update_rule, UPDATE_RULES)
        return update_rule
    if torch.is_grad_enabled() and model.training:  # the rule only matters when gradients flow
        warnings.warn(
            "use_rank() now defaults to update_rule='frozen' (DyLoRA, as DynamicRankConfig does); it was 'nested' "
            "up to hf_quailora 0.1. Pass `update_rule` explicitly to silence this warning.",
            FutureWarning,
            stacklevel=4,
        )
    return "frozen"


def _truncate(saved: list, layers: dict, adapter_name: str, b: int, frozen_below: int, rank_scaling: str) -> None:
    """Swap every layer's factors to `_TruncatedLoraLinear` at rank b, appending to `saved` what `_restore` needs
    (layer by layer, so that a failure half-way is undone too)."""
    for name, layer in layers.items():
        factors = (_innermost_linear(layer.lora_A[adapter_name]), _innermost_linear(layer.lora_B[adapter_name]))
        factor_states = [
            (f, type(f), getattr(f, "_dr_rank", None), getattr(f, "_dr_frozen_below", 0)) for f in factors
        ]
        guards = {key: layer.__dict__[key] for key in ("merge", "get_delta_weight") if key in layer.__dict__}
        saved.append((layer, layer.scaling[adapter_name], factor_states, guards))
        for axis, factor in enumerate(factors):
            factor.__class__ = _TruncatedLoraLinear
            factor._dr_axis, factor._dr_rank, factor._dr_frozen_below = axis, b, frozen_below
        layer.scaling[adapter_name] = rank_scaling_for(layer, adapter_name, b, rank_scaling)
        layer.merge = functools.partial(_refuse_merge, name)
        layer.get_delta_weight = functools.partial(_refuse_merge, name)


def _restore(saved: list, adapter_name: str) -> None:
    for layer, old_scaling, factor_states, guards in reversed(saved):
        layer.scaling[adapter_name] = old_scaling
        for key in ("merge", "get_delta_weight"):
            layer.__dict__.pop(key, None)
        layer.__dict__.update(guards)
        for factor, cls, rank, frozen in factor_states:
            factor.__class__ = cls
            if cls is _TruncatedLoraLinear:
                factor._dr_rank, factor._dr_frozen_below = rank, frozen
            else:
                for attr in ("_dr_rank", "_dr_axis", "_dr_frozen_below"):
                    factor.__dict__.pop(attr, None)


@contextmanager
def use_rank(
    model: nn.Module,
    b: int,
    update_rule: UpdateRule | None = None,
    rank_scaling: RankScaling | None = None,
    min_rank: int = 1,
    adapter_name: str = "default",
    *,
    scaling: str | None = None,
) -> Iterator[nn.Module]:
    """Run any code with every LoRA layer of `model` truncated to rank `b`: `W + s_b B[:, :b] A[:b]`.

    Works with peft's LoRA layers on unquantized, bitsandbytes 4-bit and 8-bit bases. The previous state (rank,
    update rule, scaling, module classes) is restored on exit, so the context nests.

    Args:
        model (`nn.Module`): a peft model (or any model holding peft LoRA layers).
        b (`int`): the rank, `1 ≤ b ≤ r` for every LoRA layer, and not above the trained `max_rank` recorded on
            the model (by `DynamicRankTrainer` or `load_dynamic_rank_adapter`).
        update_rule (`str`, *optional*, defaults to `"frozen"`): which components receive gradients during backward:
            `"frozen"` only component b (DyLoRA; at `b == min_rank` all of `1..min_rank`, which would otherwise
            never learn), `"nested"` all of `1..b` (QDyLoRA).
        rank_scaling (`str`, *optional*): `"per_rank"` (`α/b`), `"constant"` (peft's `α/r`) or `"rslora"`
            (`α/√b`); defaults to the scaling the adapter was trained or loaded with, else `"constant"` after
            QuAILoRA and `"per_rank"` otherwise (`spec.resolve_rank_scaling`).
        min_rank (`int`, defaults to 1): the smallest rank of training, for the frozen rule.
        adapter_name (`str`, defaults to `"default"`).
        scaling (`str`, *optional*): deprecated name of `rank_scaling`.

    Yields:
        `model`.

    Raises:
        ValueError: `b` out of range, a bad option, no (supported) LoRA layers, or a merged layer.

    Example:

    ```python
    with use_rank(model, 2, rank_scaling="constant"):
        logits = model(input_ids).logits
    ```
    """
    rank_scaling = resolve_rank_scaling(model, _renamed_scaling(rank_scaling, scaling), adapter_name)
    update_rule = _resolve_update_rule(model, update_rule)
    layers, _ = checked_rank_layers(model, b, adapter_name)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged into the base weights; unmerge it before use_rank().")
    frozen_below = b - 1 if update_rule == "frozen" and b > min_rank else 0
    state = masked_state(layers, adapter_name)
    if state is not None:  # static shapes (enable_static_rank): the same graph at every rank
        previous = state.values
        try:
            state.set(b, frozen_below, rank_scaling)
            yield model
        finally:
            state.set(*previous)
        return
    saved = []
    try:
        _truncate(saved, layers, adapter_name, b, frozen_below, rank_scaling)
        yield model
    finally:
        _restore(saved, adapter_name)


def _renamed_scaling(rank_scaling: str | None, scaling: str | None) -> str | None:
    """Map the deprecated `scaling=` argument of `use_rank` / `export_rank` onto `rank_scaling=`."""
    if scaling is None:
        return rank_scaling
    warnings.warn(
        "`scaling=` is deprecated and will be removed in hf_quailora 0.3; use `rank_scaling=` (the name every other "
        "entry point uses).",
        FutureWarning,
        stacklevel=4,
    )
    if rank_scaling is not None and rank_scaling != scaling:
        raise ValueError(
            f"Got both `rank_scaling={rank_scaling!r}` and `scaling={scaling!r}`; pass only `rank_scaling`."
        )
    return scaling

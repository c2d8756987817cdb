"""Static-shape truncation for `torch.compile`: the rank as a tensor and a mask over the LoRA components.

References: DyLoRA (Valipour et al., EACL 2023) and QDyLoRA (Rajabzadeh et al., EMNLP 2024 Industry); see
`truncation.py` for the slicing path and docs/dynamic_rank.md ("Dynamic rank under torch.compile").

The slicing path (`truncation._TruncatedLoraLinear`) changes the factors' class, a Python int rank and peft's Python
float `scaling[adapter]` at every rank: under dynamo each rank is a new graph, and after `recompile_limit` (8) graphs
the model silently runs uncompiled. Here every factor keeps one class and full shapes for the whole run:

- the rank `b` and the frozen bound `k` are 0-dim long tensors shared by all layers (`_RankState`), changed in place
  by `use_rank` (`fill_`), so dynamo's guards never see them;
- `lora_A` computes `h = x Aᵀ` with all r components and multiplies it by `m`, `m_i = s_b / s_r` for `i < b` and 0
  above (`s_r` is peft's `scaling[adapter]`, left constant; `s_b / s_r` comes from a per-layer table indexed by the
  rank tensor), so `s_r · B (m ⊙ h) = s_b B[:, :b] A[:b] x` and the components above b get a zero gradient;
- DyLoRA's frozen rule is a detach mask: `where(i ≥ k, A, A.detach())` (rows of A, columns of B).

Rank 0 in the state means "no rank in use": all components, ratio 1, no detach (peft's own LoRA, exactly).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .spec import rank_scaling_for


logger = logging.getLogger(__name__)


class _RankState:
    """The rank in use by every masked factor of one adapter, as tensors (values change, objects never do).

    Attributes:
        rank (`torch.Tensor`): 0-dim long, the rank b; 0 when no rank is in use.
        frozen_below (`torch.Tensor`): 0-dim long, components `< frozen_below` are detached (the frozen rule).
        values (`tuple`): `(b, frozen_below, rank_scaling)` as Python values, what `use_rank` restores on exit.
        layers (`dict`): the peft LoRA layers this state drives, by name.
    """

    def __init__(self, layers: dict, adapter_name: str, device: torch.device):
        self.rank = torch.zeros((), dtype=torch.long, device=device)
        self.frozen_below = torch.zeros((), dtype=torch.long, device=device)
        self.values: tuple[int, int, str | None] = (0, 0, None)
        self.layers = layers
        self.adapter_name = adapter_name

    def set(self, b: int, frozen_below: int, rank_scaling: str | None) -> None:
        """Put rank `b` (0: none) in use, in place; the ratio tables are rewritten only when the scaling changes."""
        if rank_scaling is not None and rank_scaling != self.values[2]:
            for layer in self.layers.values():
                factor = layer.lora_A[self.adapter_name]
                factor._dr_ratio.copy_(_ratio_table(layer, self.adapter_name, rank_scaling, factor._dr_ratio.numel()))
        else:
            rank_scaling = self.values[2]
        self.rank.fill_(b)
        self.frozen_below.fill_(frozen_below)
        self.values = (b, frozen_below, rank_scaling)


def _ratio_table(layer, adapter_name: str, rank_scaling: str, size: int) -> torch.Tensor:
    """`[1, s_1/s_r, s_2/s_r, ...]`: entry b is the scaling at rank b over peft's scaling (entry 0: no rank)."""
    s_r = layer.scaling[adapter_name]
    ratios = [1.0] + [rank_scaling_for(layer, adapter_name, b, rank_scaling) / s_r for b in range(1, size)]
    return torch.tensor(ratios, dtype=torch.float32)


class _MaskedLoraLinear(nn.Linear):
    """peft's `lora_A` / `lora_B` `nn.Linear` with full shapes, masked to the rank of `_dr_state` (see the module
    docstring). `_dr_axis` is 0 for `lora_A` (which also applies the rank mask and scaling ratio) and 1 for `lora_B`.
    """

    _dr_state: _RankState
    _dr_axis: int = 0
    _dr_index: torch.Tensor  # arange(r)
    _dr_ratio: torch.Tensor  # lora_A only: s_b / s_r by b (0: 1.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state, index = self._dr_state, self._dr_index
        rank, frozen_below = state.rank, state.frozen_below
        if rank.device != self.weight.device:  # a model spread over devices: static per layer, no guard on values
            rank, frozen_below = rank.to(self.weight.device), frozen_below.to(self.weight.device)
        learns = index >= frozen_below  # DyLoRA "frozen": only components >= k receive a gradient
        if self._dr_axis == 1:
            weight = torch.where(learns.unsqueeze(0), self.weight, self.weight.detach())
            return F.linear(input, weight, self.bias)
        weight = torch.where(learns.unsqueeze(1), self.weight, self.weight.detach())
        h = F.linear(input, weight, self.bias)
        active = (index < rank) | (rank == 0)
        ratio = self._dr_ratio.index_select(0, rank.reshape(1))  # a tensor index: no .item(), no graph break
        mask = torch.where(active, ratio, 0.0)  # components above b: 0; below: s_b / s_r
        return (h.float() * mask).to(h.dtype)


def enable_masks(layers: dict, adapter_name: str) -> _RankState:
    """Turn every layer's factors into `_MaskedLoraLinear` sharing one new `_RankState` (no rank in use)."""
    device = next(iter(layers.values())).lora_A[adapter_name].weight.device
    state = _RankState(layers, adapter_name, device)
    for layer in layers.values():
        for axis, factor in enumerate((layer.lora_A[adapter_name], layer.lora_B[adapter_name])):
            device = factor.weight.device
            factor.__class__ = _MaskedLoraLinear
            factor._dr_state, factor._dr_axis = state, axis
            factor._dr_index = torch.arange(layer.r[adapter_name], device=device)
            if axis == 0:
                factor._dr_ratio = torch.ones(layer.r[adapter_name] + 1, dtype=torch.float32, device=device)
    return state


def disable_masks(layers: dict, adapter_name: str) -> None:
    """Give every layer's factors back their `nn.Linear` class."""
    for layer in layers.values():
        for factor in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if type(factor) is _MaskedLoraLinear:
                factor.__class__ = nn.Linear
                for attr in ("_dr_state", "_dr_axis", "_dr_index", "_dr_ratio"):
                    factor.__dict__.pop(attr, None)


def masked_state(layers: dict, adapter_name: str) -> _RankState | None:
    """The `_RankState` of the layers when all their factors are masked, else None (the slicing path)."""
    states = {
        id(getattr(factor, "_dr_state", None)): getattr(factor, "_dr_state", None)
        for layer in layers.values()
        for factor in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
    }
    if len(states) == 1:
        return next(iter(states.values()))
    if None in states.values():
        raise ValueError(
            "Some LoRA layers use static (compiled) truncation and others do not; call enable_static_rank(model) "
            "again after adding LoRA layers."
        )
    raise ValueError("The LoRA layers belong to different static rank states; call enable_static_rank(model) again.")


def _refuse_merge(name: str, *args, **kwargs):
    raise RuntimeError(
        f"{name}: cannot merge or compute the delta weight while a truncated rank is in use (use_rank); peft's merge "
        "reads the full-rank factors. Export the rank with export_rank() and merge that adapter instead."
    )


def enable_static_rank(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Make `use_rank` keep every shape static, so that a compiled model runs one graph at every rank.

    The factors keep their full shapes and one class; the rank is a tensor that `use_rank` changes in place, and a
    mask computed inside the forward truncates them (see this module's docstring). `use_rank`, `export_rank` and the
    evaluation give the same numbers as the default slicing path (to float rounding), which stays cheaper when
    nothing is compiled. `DynamicRankTrainer` calls this itself with `torch_compile=True`. Call it before
    `torch.compile`; run `backward()` inside the `use_rank` block that ran the forward (as the trainer does).

    Args:
        model (`nn.Module`): a peft model (or any model holding peft LoRA layers), not merged.
        adapter_name (`str`, defaults to `"default"`).

    Returns:
        `model`.

    Raises:
        ValueError: no (supported) LoRA layers, or a rank in use (inside `use_rank`).

    Example:

    ```python
    from hf_quailora.dynamic_rank import enable_static_rank, use_rank

    enable_static_rank(model)
    compiled = torch.compile(model)
    for b in range(1, 65):
        with use_rank(model, b, update_rule="frozen"):
            compiled(**batch).loss.backward()  # compiled once
    ```
    """
    from .truncation import _TruncatedLoraLinear, find_dynamic_rank_layers

    layers = find_dynamic_rank_layers(model, adapter_name)
    if masked_state(layers, adapter_name) is not None:
        return model
    if any(type(layer.lora_A[adapter_name]) is _TruncatedLoraLinear for layer in layers.values()):
        raise ValueError("enable_static_rank() cannot run inside use_rank(); call it before.")
    state = enable_masks(layers, adapter_name)
    for name, layer in layers.items():  # merging reads the full factors: refused while a rank is in use
        for method in ("merge", "get_delta_weight"):
            layer.__dict__[method] = functools.partial(_unless_truncated, layer, name, state, method)
    return model


def disable_static_rank(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Undo `enable_static_rank`: `use_rank` slices the factors again. Returns `model`.

    Raises:
        ValueError: a rank in use (inside `use_rank`).
    """
    from .truncation import find_dynamic_rank_layers

    layers = find_dynamic_rank_layers(model, adapter_name)
    state = masked_state(layers, adapter_name)
    if state is None:
        return model
    if state.values[0] != 0:
        raise ValueError("disable_static_rank() cannot run inside use_rank(); call it after.")
    disable_masks(layers, adapter_name)
    for layer in layers.values():
        for method in ("merge", "get_delta_weight"):
            layer.__dict__.pop(method, None)
    return model


def _unless_truncated(layer, name: str, state, method: str, *args, **kwargs):
    if state.values[0] != 0:
        _refuse_merge(name)
    return getattr(type(layer), method)(layer, *args, **kwargs)


class _CompileFallbackWatch(logging.Filter):
    """Turns dynamo's quiet falls back to eager into one plain warning per cause (a filter on dynamo's loggers
    that lets every record through: dynamo's own message still appears)."""

    LOGGERS = ("torch._dynamo.convert_frame", "torch._dynamo.exc")
    CAUSES = {
        "hit config.": (
            "torch.compile hit dynamo's recompile limit: from here on the model's forward runs uncompiled (eager), "
            "as fast as without torch_compile and no faster. With dynamic rank the rank itself never recompiles "
            "(static-shape truncation); something else changes between steps (see dynamo's message above, "
            "TORCH_LOGS=recompiles). Raise torch._dynamo.config.recompile_limit or remove the cause."
        ),
        "Backend compiler": (
            "torch.compile's backend failed on part of the model: dynamo split the graph there and runs that part "
            "uncompiled (eager), more slowly than compiled. The cause is in dynamo's message above (with a quantized "
            "base, see 'Dynamic rank under torch.compile' in docs/dynamic_rank.md)."
        ),
    }

    def __init__(self):
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = str(record.msg)
            for cause, text in self.CAUSES.items():
                if cause in message and cause not in self.warned:
                    self.warned.add(cause)
                    logger.warning(text)
        return True

    def install(self) -> None:
        for name in self.LOGGERS:
            if self not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(self)


COMPILE_WATCH = _CompileFallbackWatch()  # one per process: each cause is said once

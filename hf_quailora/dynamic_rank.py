"""Dynamic-rank LoRA: rank sampling, truncation of peft's LoRA factors, per-rank use and export.

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
from hf_quailora import use_rank, export_rank

with use_rank(peft_model, 4):  # every LoRA layer now computes W x + (α/4) B[:, :4] A[:4] x
    loss = peft_model(**batch).loss
export_rank(peft_model, 4, "adapter-r4")  # an ordinary peft adapter with r=4
```
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .quailora import find_lora_layers


logger = logging.getLogger(__name__)

UPDATE_RULES = ("frozen", "nested")
RANK_SCALINGS = ("per_rank", "constant", "rslora")
RANK_DISTRIBUTIONS = ("uniform", "weighted")


# ---------------------------------------------------------------------------------------------------------------------
# Rank sampling
# ---------------------------------------------------------------------------------------------------------------------


class RankSampler:
    """Seeded draws of the LoRA rank, one per optimizer step (DyLoRA's `b ~ p_B`).

    Every process of a multi-process run builds the same sampler from the same seed and so draws the same sequence;
    `state_dict()` / `load_state_dict()` carry the generator state through checkpoints, so a resumed run continues the
    sequence of the uninterrupted one.

    Args:
        min_rank (`int`): smallest rank drawn (≥ 1).
        max_rank (`int`): largest rank drawn (≥ `min_rank`).
        distribution (`str`, defaults to `"uniform"`): `"uniform"` over `[min_rank, max_rank]` (DyLoRA) or
            `"weighted"` over `choices` with probabilities proportional to `weights`.
        choices (`list[int]`, *optional*): ranks of the `"weighted"` distribution, each in `[min_rank, max_rank]`.
        weights (`list[float]`, *optional*): positive weights, one per choice.
        seed (`int`, defaults to 0): seed of the `torch.Generator`.

    Raises:
        ValueError: a bad range, distribution, choice or weight.

    Example:

    ```python
    sampler = RankSampler(1, 8, seed=42)
    ranks = [sampler.sample() for _ in range(4)]
    ```
    """

    def __init__(
        self,
        min_rank: int,
        max_rank: int,
        distribution: Literal["uniform", "weighted"] = "uniform",
        choices: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ):
        check_rank_range(min_rank, max_rank)
        if distribution not in RANK_DISTRIBUTIONS:
            raise ValueError(f"`rank_distribution` must be one of {RANK_DISTRIBUTIONS}; got {distribution!r}.")
        if distribution == "uniform":
            if choices is not None or weights is not None:
                raise ValueError(
                    "`rank_choices`/`rank_weights` are only used with rank_distribution='weighted'; got "
                    f"choices={choices!r}, weights={weights!r} with 'uniform'. Set rank_distribution='weighted' or "
                    "drop them."
                )
            choices = list(range(min_rank, max_rank + 1))
            weights = [1.0] * len(choices)
        else:
            choices, weights = check_weighted_ranks(
                choices, weights, min_rank, max_rank, "rank_choices", "rank_weights"
            )
        self.min_rank, self.max_rank = int(min_rank), int(max_rank)
        self.distribution = distribution
        self.choices = [int(c) for c in choices]
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.num_draws = 0
        self._probabilities = torch.tensor(self.weights, dtype=torch.float64) / sum(self.weights)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def sample(self) -> int:
        """Draw the next rank."""
        index = torch.multinomial(self._probabilities, 1, generator=self.generator).item()
        self.num_draws += 1
        return self.choices[index]

    def describe(self) -> dict:
        """The settings that must match for a checkpoint to be resumed."""
        return {
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "distribution": self.distribution,
            "choices": self.choices,
            "weights": self.weights,
        }

    def state_dict(self) -> dict:
        generator = self.generator.get_state()
        return {**self.describe(), "seed": self.seed, "num_draws": self.num_draws, "generator": generator}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state.

        Raises:
            ValueError: the state was written with a different rank range or distribution.
        """
        saved = {key: state.get(key) for key in self.describe()}
        if saved != self.describe():
            raise ValueError(
                f"The checkpoint's rank sampler was written with {saved}, but this run uses {self.describe()}. "
                "Resume with the same `min_rank`, `max_rank`, `rank_distribution`, `rank_choices` and `rank_weights`, "
                "or start a new run."
            )
        self.seed = int(state["seed"])
        self.num_draws = int(state["num_draws"])
        self.generator.set_state(state["generator"])


def check_rank_range(min_rank, max_rank) -> None:
    """Raise a `TypeError`/`ValueError` naming the field unless `1 ≤ min_rank ≤ max_rank` are integers."""
    for name, value in (("min_rank", min_rank), ("max_rank", max_rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an integer; got {value!r} ({type(value).__name__}).")
    if min_rank < 1:
        raise ValueError(f"`min_rank` ({min_rank}) must be at least 1.")
    if min_rank > max_rank:
        raise ValueError(f"`min_rank` ({min_rank}) exceeds `max_rank` ({max_rank}); lower one or raise the other.")


def check_weighted_ranks(choices, weights, min_rank, max_rank, choices_name, weights_name):
    """Validate a list of ranks and its weights; return them as lists. `weights=None` means equal weights."""
    if choices is None or len(choices) == 0:
        raise ValueError(f"`{choices_name}` must be a non-empty list of ranks; got {choices!r}.")
    choices = list(choices)
    for c in choices:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"`{choices_name}` must hold integers; got {c!r} in {choices}.")
        if not min_rank <= c <= max_rank:
            raise ValueError(
                f"`{choices_name}` holds rank {c}, outside [min_rank, max_rank] = [{min_rank}, {max_rank}]."
            )
    if len(set(choices)) != len(choices):
        raise ValueError(f"`{choices_name}` ({choices}) repeats a rank; give each rank once.")
    if weights is None:
        weights = [1.0] * len(choices)
    weights = list(weights)
    if len(weights) != len(choices):
        raise ValueError(
            f"`{weights_name}` has {len(weights)} entries but `{choices_name}` has {len(choices)}; "
            "give one weight per rank."
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"`{weights_name}` must hold positive finite numbers; got {w!r} in {weights}.")
    return choices, weights


# ---------------------------------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------------------------------


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


def _refuse_merge(name: str, *args, **kwargs):
    raise RuntimeError(
        f"{name}: cannot merge or compute the delta weight while a truncated rank is in use (use_rank); peft's merge "
        "reads the full-rank factors. Export the rank with export_rank() and merge that adapter instead."
    )


def rank_scaling_for(layer, adapter_name: str, b: int, scaling: str) -> float:
    """The LoRA scaling of `layer` at rank `b`.

    `"per_rank"`: `α / b` (DyLoRA); `"rslora"`: `α / √b`; `"constant"`: peft's scaling at the full LoRA r
    (`α / r`, or `α / √r` for an rsLoRA adapter), the same at every b, so that QuAILoRA's sorted components stay
    optimal.
    """
    alpha = layer.lora_alpha[adapter_name]
    if scaling == "per_rank":
        return alpha / b  # DyLoRA, Valipour et al. 2023: scaling α / b at rank b
    if scaling == "rslora":
        return alpha / math.sqrt(b)
    if scaling == "constant":
        r = layer.r[adapter_name]
        return alpha / math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else alpha / r
    raise ValueError(f"`rank_scaling` must be one of {RANK_SCALINGS}; got {scaling!r}.")


def find_dynamic_rank_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The LoRA layers of `model` that dynamic rank supports, checked.

    Raises:
        ValueError: no LoRA layers with `adapter_name`, or a layer with DoRA / another LoRA variant, `lora_bias`, or
            factors that are not `nn.Linear` (embedding or convolution LoRA).
    """
    layers = find_lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(
            f"The model has no LoRA layers with adapter {adapter_name!r}; wrap it with peft's get_peft_model "
            "(e.g. LoraConfig(target_modules='all-linear')) or pass `peft_config=` to the trainer."
        )
    for name, layer in layers.items():
        if adapter_name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter_name, False):
            raise ValueError(f"{name}: dynamic rank supports plain LoRA only; DoRA and other LoRA variants are not.")
        if layer.lora_bias.get(adapter_name, False):
            raise ValueError(f"{name}: dynamic rank does not support `lora_bias=True`; set it to False.")
        for factor in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if type(factor) not in (nn.Linear, _TruncatedLoraLinear):
                raise ValueError(
                    f"{name}: dynamic rank needs `nn.Linear` LoRA factors; got {type(factor).__name__}. Exclude this "
                    "layer from `target_modules`."
                )
    return layers


def lora_rank_of(model: nn.Module, adapter_name: str = "default") -> int:
    """The largest rank every LoRA layer supports (the smallest LoRA r over layers, e.g. with `rank_pattern`)."""
    return min(layer.r[adapter_name] for layer in find_dynamic_rank_layers(model, adapter_name).values())


@contextmanager
def use_rank(
    model: nn.Module,
    b: int,
    update_rule: Literal["frozen", "nested"] = "nested",
    scaling: Literal["per_rank", "constant", "rslora"] = "per_rank",
    min_rank: int = 1,
    adapter_name: str = "default",
) -> Iterator[nn.Module]:
    """Run any code with every LoRA layer of `model` truncated to rank `b`: `W + s_b B[:, :b] A[:b]`.

    Works with peft's LoRA layers on unquantized, bitsandbytes 4-bit and 8-bit bases. The previous state (rank,
    update rule, scaling, module classes) is restored on exit, so the context nests.

    Args:
        model (`nn.Module`): a peft model (or any model holding peft LoRA layers).
        b (`int`): the rank, `1 ≤ b ≤ r` for every LoRA layer.
        update_rule (`str`, defaults to `"nested"`): which components receive gradients during backward:
            `"nested"` all of `1..b` (QDyLoRA), `"frozen"` only component b (DyLoRA; at `b == min_rank` all of
            `1..min_rank`, which would otherwise never learn).
        scaling (`str`, defaults to `"per_rank"`): `"per_rank"` (`α/b`), `"constant"` (peft's `α/r`) or
            `"rslora"` (`α/√b`).
        min_rank (`int`, defaults to 1): the smallest rank of training, for the frozen rule.
        adapter_name (`str`, defaults to `"default"`).

    Yields:
        `model`.

    Raises:
        ValueError: `b` out of range, a bad option, no (supported) LoRA layers, or a merged layer.

    Example:

    ```python
    with use_rank(model, 2):
        logits = model(input_ids).logits
    ```
    """
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"`update_rule` must be one of {UPDATE_RULES}; got {update_rule!r}.")
    if scaling not in RANK_SCALINGS:
        raise ValueError(f"`rank_scaling` must be one of {RANK_SCALINGS}; got {scaling!r}.")
    layers = find_dynamic_rank_layers(model, adapter_name)
    max_rank = min(layer.r[adapter_name] for layer in layers.values())
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"The rank must be an integer; got {b!r} ({type(b).__name__}).")
    if not 1 <= b <= max_rank:
        raise ValueError(f"Rank {b} is out of range: the model's LoRA layers allow ranks 1..{max_rank}.")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged into the base weights; unmerge it before use_rank().")
    frozen_below = b - 1 if update_rule == "frozen" and b > min_rank else 0

    saved = []
    try:
        for name, layer in layers.items():
            factors = (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
            saved.append(
                (
                    layer,
                    layer.scaling[adapter_name],
                    [(f, type(f), f._dr_rank if isinstance(f, _TruncatedLoraLinear) else None,
                      getattr(f, "_dr_frozen_below", 0)) for f in factors],
                    {key: layer.__dict__[key] for key in ("merge", "get_delta_weight") if key in layer.__dict__},
                )
            )
            for axis, factor in enumerate(factors):
                factor.__class__ = _TruncatedLoraLinear
                factor._dr_axis = axis
                factor._dr_rank = b
                factor._dr_frozen_below = frozen_below
            layer.scaling[adapter_name] = rank_scaling_for(layer, adapter_name, b, scaling)
            layer.merge = functools.partial(_refuse_merge, name)
            layer.get_delta_weight = functools.partial(_refuse_merge, name)
        yield model
    finally:
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


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def export_rank(
    model: nn.Module,
    b: int,
    output_dir: str,
    scaling: Literal["per_rank", "constant", "rslora"] = "per_rank",
    adapter_name: str = "default",
) -> str:
    """Save rank `b` of a dynamic-rank adapter as an ordinary peft LoRA adapter with `r = b`.

    The factors are `A[:b]`, `B[:, :b]`; `lora_alpha` is chosen so that peft's scaling (`lora_alpha / b`, or
    `lora_alpha / √b` with rsLoRA) equals the trained scaling at b. Vanilla
    `PeftModel.from_pretrained(base, output_dir)` loads it and reproduces `use_rank(model, b, scaling=scaling)`.
    Other trainable modules of the adapter (`modules_to_save`) are saved unchanged. Layers whose trained scaling
    differs from the most common one get an `alpha_pattern` entry (their full module name).

    Args:
        model (`PeftModel`): the trained dynamic-rank model.
        b (`int`): the rank to export, `1 ≤ b ≤ r`.
        output_dir (`str`): folder to write `adapter_config.json` and `adapter_model.safetensors` into.
        scaling (`str`, defaults to `"per_rank"`): the `rank_scaling` the adapter was trained with.
        adapter_name (`str`, defaults to `"default"`).

    Returns:
        `str`: `output_dir`.

    Raises:
        TypeError: `model` is not a `PeftModel`.
        ValueError: `b` out of range, a bad `scaling`, or no (supported) LoRA layers.

    Example:

    ```python
    export_rank(trainer.model, 4, "out/rank-4", scaling=trainer.args.rank_scaling)
    model = PeftModel.from_pretrained(base_model, "out/rank-4")
    ```
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not isinstance(model, PeftModel):
        raise TypeError(f"export_rank needs a peft `PeftModel`; got {type(model).__name__}.")
    if scaling not in RANK_SCALINGS:
        raise ValueError(f"`rank_scaling` must be one of {RANK_SCALINGS}; got {scaling!r}.")
    layers = find_dynamic_rank_layers(model, adapter_name)
    max_rank = min(layer.r[adapter_name] for layer in layers.values())
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"The export rank must be an integer; got {b!r} ({type(b).__name__}).")
    if not 1 <= b <= max_rank:
        raise ValueError(f"Export rank {b} is out of range: the model's LoRA layers allow ranks 1..{max_rank}.")

    # 1. peft's scaling at r=b is lora_alpha / b (or / √b): pick lora_alpha per layer to equal the trained scaling.
    use_rslora = scaling == "rslora"
    alphas = {}
    for name, layer in layers.items():
        s_b = rank_scaling_for(layer, adapter_name, b, scaling)
        alphas[name] = s_b * (math.sqrt(b) if use_rslora else b)
    values = list(alphas.values())
    default_alpha = max(set(values), key=values.count)
    if float(default_alpha).is_integer():
        default_alpha = int(default_alpha)
    prefix = "base_model.model."
    alpha_pattern = {
        re.escape(name[len(prefix):] if name.startswith(prefix) else name): alpha
        for name, alpha in alphas.items()
        if not math.isclose(alpha, default_alpha, rel_tol=0, abs_tol=0)
    }
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.r = b
    config.lora_alpha = default_alpha
    config.use_rslora = use_rslora
    config.rank_pattern = {}
    config.alpha_pattern = alpha_pattern
    config.init_lora_weights = True
    config.inference_mode = True

    # 2. Slice the factors; every other tensor of the adapter is kept as is.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    sliced = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight") and key[: -len(".lora_A.weight")] in layers:
            tensor = tensor[:b]
        elif key.endswith(".lora_B.weight") and key[: -len(".lora_B.weight")] in layers:
            tensor = tensor[:, :b]
        sliced[key] = tensor.detach().contiguous().clone()

    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(sliced, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output_dir, "dynamic_rank.json"), "w") as handle:
        json.dump({"rank": b, "rank_scaling": scaling, "max_rank": max_rank}, handle, indent=1)
    return output_dir

"""The step a learning rate takes from a QuAILoRA start, against peft's default start (issue 36).

peft starts LoRA with B = 0 and A drawn from Kaiming-uniform(a = √5), U(−1/√d_in, 1/√d_in), so ‖A‖²_F = r/3 in
expectation. Adam moves each factor entry by about the learning rate η on the first steps, whatever its gradient's
size, so the product W = s·BA (s = α/r) moves by

    ‖ΔW‖²_F ≈ η² s² (d_out ‖A‖²_F + d_in ‖B‖²_F)        (ΔB·A and B·ΔA, entries of ΔB and ΔA of size η)

From peft's start that is η² s² d_out r/3. QuAILoRA's balanced factors (docs/quailora.md) are both non-zero, and on
Gemma-3-270m A's rows are larger than peft's default, so the same η moves the product further: the "larger
effective step" that makes a QuAILoRA start drift at the recipe's learning rate (bench/RESULTS.md, issue 36).
`quailora_step_ratio` is the square root of the ratio of the two sums over every adapted layer; the bench
`bench/bench_lr_step.py` compares it with the step actually measured.
"""

from __future__ import annotations

import math

import torch

from .._peft_utils import require_lora_layers


def quailora_step_ratio(model: torch.nn.Module, adapter_name: str = "default") -> float:
    """How much further one Adam step moves the LoRA product from `model`'s adapter than from peft's default start.

    Args:
        model: a peft model whose adapter holds the start to measure (e.g. after `quailora_init`).
        adapter_name (`str`, defaults to `"default"`): the adapter.

    Returns:
        `sqrt(Σ s² (d_out ‖A‖² + d_in ‖B‖²) / Σ s² d_out r / 3)` over every LoRA layer (see the module): 1 for an
        adapter with peft's own start in expectation, more when the factors are larger.

    Raises:
        ValueError: the model has no LoRA layer with `adapter_name`.
    """
    moved = default = 0.0
    for layer in require_lora_layers(model, adapter_name).values():
        a = _whole(layer.lora_A[adapter_name].weight)
        b = _whole(layer.lora_B[adapter_name].weight)
        rank, d_in = a.shape
        d_out = b.shape[0]
        scale = float(layer.scaling[adapter_name]) ** 2
        a_norm, b_norm = (float(factor.detach().float().pow(2).sum()) for factor in (a, b))
        moved += scale * (d_out * a_norm + d_in * b_norm)
        default += scale * d_out * rank / 3
    return math.sqrt(moved / default)


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """A factor as one tensor: an FSDP2 `DTensor` shard is gathered (a collective: every process calls this)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def parse_lr_scale(value) -> float | None:
    """`QuAILoRAConfig.lr_scale` → a positive finite multiplier, or None for `"auto"`.

    Raises:
        ValueError: anything but `"auto"` or a positive finite number (or its string, as a parser gives it).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"`lr_scale` ({value!r}) must be 'auto' (the learning rate divided by `quailora_step_ratio`, at most 1) "
            "or a positive number that multiplies the learning rate (1: unchanged)."
        )
    return scale


def resolve_lr_scale(value, model: torch.nn.Module, adapter_name: str = "default") -> tuple[float, float]:
    """The multiplier `lr_scale` gives for `model`'s start, and the start's `quailora_step_ratio`: `(scale, ratio)`.

    `"auto"` is `min(1, 1 / ratio)`: the first Adam steps then move the product no further than from peft's default
    start at the user's learning rate. A number is used as it is.
    """
    ratio = quailora_step_ratio(model, adapter_name)
    scale = parse_lr_scale(value)
    return (min(1.0, 1.0 / ratio) if scale is None else scale), ratio


def scale_learning_rate(optimizer, lr_scheduler, scale: float) -> None:
    """Multiply the learning rate of every parameter group of a created `optimizer` (and the base rates its
    `lr_scheduler` computes from) by `scale`, before the first step.

    Raises:
        ValueError: a scheduler without `base_lrs` (not a torch `LRScheduler`, e.g. DeepSpeed's own), whose rates
            could not follow; nothing is changed then.
    """
    if lr_scheduler is not None and not hasattr(lr_scheduler, "base_lrs"):
        raise ValueError(
            f"QuAILoRA's `lr_scale` cannot scale the rates of a {type(lr_scheduler).__name__} (no `base_lrs`); set "
            "`lr_scale=1` and lower the learning rate yourself."
        )
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * scale
    if lr_scheduler is not None:
        lr_scheduler.base_lrs = [rate * scale for rate in lr_scheduler.base_lrs]
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

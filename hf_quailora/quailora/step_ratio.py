"""The step a learning rate takes from a QuAILoRA start, against peft's default start (issue 36).

peft starts LoRA with B = 0 and A drawn from Kaiming-uniform(a = √5), U(−1/√d_in, 1/√d_in), so ‖A‖²_F = r/3 in
expectation. Adam moves each factor entry by about the learning rate η on the first steps, whatever its gradient's
size, so the product W = s·BA (s = α/r) moves by

    ‖ΔW‖²_F ≈ η² s² (d_out ‖A‖²_F + d_in ‖B‖²_F)        (ΔB·A and B·ΔA, entries of ΔB and ΔA of size η)

From peft's start that is η² s² d_out r/3. QuAILoRA's balanced factors (docs/quailora.md) are both non-zero; where
they are larger than peft's default A, the same η moves the product further: the "larger effective step" issue 36
suspected behind a QuAILoRA start's drift at the recipe's learning rate. (The cross term of ΔB·A and B·ΔA is left
out: it vanishes in expectation for sign steps, and the prediction below matches the measurement.)
`quailora_step_ratio` is the square root of the ratio of the two sums over every adapted layer; the bench
`bench/bench_lr_step.py` compares it with the step actually measured (bench/RESULTS.md, "Issue 36: the step of a
QuAILoRA start"): the prediction holds (2.231 against 2.223 on SmolLM2-135M, 0.992 against 0.994 on Gemma-3-270m,
r = 64), but the model whose start takes the larger step (SmolLM2) is the one that does not drift. So no learning
rate is derived from it: `QuAILoRAInitCallback` logs it, as a diagnostic.
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
        ValueError: the model has no (linear) LoRA layer with `adapter_name`.
    """
    moved = default = 0.0
    for layer in require_lora_layers(model, adapter_name).values():
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.dim() != 2:  # a convolution's LoRA: not a product of two matrices (quailora_init skips them too)
            continue
        rank, d_in = a.shape
        d_out = b.shape[0]
        scale = float(layer.scaling[adapter_name]) ** 2
        moved += scale * (d_out * _sum_of_squares(a) + d_in * _sum_of_squares(b))
        default += scale * d_out * rank / 3
    if default == 0:
        raise ValueError(f"The model has no linear LoRA layer with adapter {adapter_name!r}: no step ratio to give.")
    return math.sqrt(moved / default)


def _sum_of_squares(weight: torch.Tensor) -> float:
    """‖weight‖²_F; an FSDP2 `DTensor` shard sums locally and all-reduces (a collective: every process calls it)."""
    total = weight.detach().float().pow(2).sum()
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)

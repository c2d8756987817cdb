"""How far the first optimizer step moves a QuAILoRA start, in what the model predicts, and the learning rate that
keeps it within the start's own correction (issue 36).

A QuAILoRA start differs from the quantized base by a correction: its predictions move from the NF4 base's towards
the full-precision model's. Measure that correction as

    C = mean over tokens of KL(p_start ‖ p_base)         (p_base: the same model with the adapter switched off)

Adam's first step moves every adapter entry by the learning rate η against the sign of its gradient
(m̂ / √v̂ = g / |g| on step 1, whatever the gradient's size), so the step itself can be taken exactly, without an
optimizer: θ₁ = θ₀ − η · sign(∇L(θ₀)). Measure how far it moves the predictions as

    S(η) = mean over tokens of KL(p_start ‖ p_θ₁)

On the two embedded real models at η = 2e-4 (r = 64, bench/bench_lr_step.py, bench/RESULTS.md "the first step in
what the model predicts"), one step moves SmolLM2-135M by 4% of its correction and Gemma-3-270m by 41%: per unit of
learning rate Gemma's predictions move 5.6× as far from a QuAILoRA start (10× from QLoRA's), and its correction is
1.8× smaller. The weight-space ratio
of `quailora_step_ratio` missed this (2.2 on SmolLM2, 1.0 on Gemma). Gemma is the model whose QuAILoRA start drifts
at 2e-4 and keeps its lead at half that rate (58% of the Alpaca perplexity gap closed after 40 steps over 3 seeds,
against 35%); SmolLM2 loses 13 points when its rate is halved.

`quailora_lr_scale` turns this into a rule: the largest of 1, 1/2, 1/4, ... (at least `min_scale`) for which the first
step stays within `budget` of the correction, S(η · scale) ≤ budget · C. The ratio S / C depends on the text it is
measured on, so the budget is set on the measurement `QuAILoRAInitCallback` makes, on the recipe's train batches at
2e-4, r = 64, over six disjoint sets of 8 examples per model (bench/bench_lr_rule.py): SmolLM2 0.12–0.29 at the full
rate, Gemma 0.69–1.37 at the full rate and 0.22–0.44 at half. With the two recipe checks (Gemma 0.457 at half), any budget from 0.457 to 0.69 gives both models the
rates that won on every set; 0.5 also gives them on windows of the training examples (the calibration data, used
without a train dataloader: SmolLM2 0.07, Gemma 0.60 → 0.16). It is a rule fitted to two models, with narrow margins,
not a law: a third model would test it.
Halvings (not a continuous scale) keep the chosen rate on the grid the benchmark measured and stable against the
noise of a few calibration windows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .._dist_utils import _collective_device, has_sharded_parameters, is_distributed
from .._peft_utils import require_lora_layers
from .sharded import run_on_every_process


DEFAULT_BUDGET = 0.5  # S(η) ≤ 0.5 C (module docstring: fitted so that the two measured models get their best rates)
DEFAULT_MIN_SCALE = 0.125  # at most three halvings


class TooFewSequencesError(ValueError):
    """Too little calibration data to measure the first step on (raised on every process alike)."""


@dataclass
class FirstStep:
    """What `quailora_first_step` measured.

    Attributes:
        learning_rate (`float`): the rate the scales multiply.
        correction_kl (`float`): C, mean per-token KL(start ‖ adapter off) in nats.
        step_kl (`dict[float, float]`): S(η · scale) for each scale tried, in nats.
        tokens (`int`): the tokens both are averaged over (all processes).
    """

    learning_rate: float
    correction_kl: float
    step_kl: dict[float, float] = field(default_factory=dict)
    tokens: int = 0

    def ratio(self, scale: float) -> float:
        """S(η · scale) / C: the first step's reach, as a fraction of the correction."""
        return self.step_kl[scale] / self.correction_kl if self.correction_kl > 0 else math.inf


def _adapter_parameters(model: torch.nn.Module, adapter_name: str) -> tuple[dict, list[torch.nn.Parameter]]:
    """The LoRA layers and their trainable factors (Adam never moves a frozen one)."""
    layers = require_lora_layers(model, adapter_name)
    params = []
    for layer in layers.values():
        params += [w for w in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight) if w.requires_grad]
    if not params:
        raise ValueError(f"Adapter {adapter_name!r} has no trainable LoRA factor: there is no first step to measure.")
    return layers, params


@contextlib.contextmanager
def _adapter_off(layers: dict, adapter_name: str):
    """The adapter's output scaled to zero (the base model), restored after: peft's LoRA forwards (`Linear`,
    `Linear4bit`, `Linear8bitLt`) multiply the adapter's output by `scaling[adapter]`."""
    saved = {name: layer.scaling[adapter_name] for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.scaling[adapter_name] = 0.0
        yield
    finally:
        for name, layer in layers.items():
            layer.scaling[adapter_name] = saved[name]


@contextlib.contextmanager
def _stepped(params: list[torch.nn.Parameter], signs: list[torch.Tensor], step: float):
    """The adapter after Adam's first step of size `step` (θ − step · sign g), restored exactly after."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, sign in zip(params, signs):
                p.sub_(step * sign.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)


def _sequences(batches, max_sequences: int, device, max_length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """One sequence per forward (a large vocabulary's logits stay small), padding dropped (left or right), cut to
    `max_length` tokens, at most `max_sequences`."""
    out = []
    for batch in batches:
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        for ids, keep in zip(batch["input_ids"], mask):
            ids = ids[keep.to(ids.device).bool()][:max_length]
            if ids.numel() >= 2:
                out.append({"input_ids": ids[None].to(device)})
            if len(out) == max_sequences:
                return out
    return out


def _log_probs(model, sequence) -> torch.Tensor:
    return torch.log_softmax(model(**sequence).logits[0].float(), dim=-1)


def _kl_sum(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum())


def _all_reduce(values: list[float]) -> list[float]:
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def quailora_first_step(
    model: torch.nn.Module,
    batches,
    learning_rate: float,
    scales=(1.0, 0.5, 0.25, 0.125),
    max_sequences: int = 8,
    adapter_name: str = "default",
    max_length: int | None = None,
) -> FirstStep:
    """Measure a QuAILoRA start's correction and how far Adam's first step moves it, in KL (see the module).

    Runs in eval mode (no dropout, no gradient checkpointing), takes the gradient of the language-model loss on the
    sequences with `torch.autograd.grad` (the parameters' `.grad` and any DDP hooks stay untouched), and leaves the
    adapter exactly as it found it. Under DDP every process measures its own sequences and the sums are all-reduced,
    so every process gets the same numbers.

    Args:
        model: a peft model with a LoRA adapter (e.g. after `quailora_init`).
        batches: `{"input_ids", "attention_mask"}` batches (`make_calibration_batches`), e.g. the calibration data.
        learning_rate (`float`): the run's learning rate η.
        scales: the multipliers of η to take the step at.
        max_sequences (`int`, defaults to 8): sequences to use (per process): the step is taken on every other one
            and measured on the rest.
        adapter_name (`str`, defaults to `"default"`).
        max_length (`int`, *optional*): tokens kept per sequence (its first ones); `None` keeps all.

    Returns:
        `FirstStep`.

    Raises:
        ValueError: a learning rate or scale that is not positive, sharded parameters (FSDP, tensor parallelism: not
            measured here), or no LoRA layer with `adapter_name`; `TooFewSequencesError` (a `ValueError`), on every
            process alike, when a process has fewer than two sequences of two tokens or more.
    """
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` ({learning_rate!r}) must be a positive number.")
    if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
        raise ValueError(f"`scales` ({scales!r}) must be positive numbers.")
    if has_sharded_parameters(model):
        raise ValueError("The first step is measured on whole parameters; this model's are sharded (FSDP or tensor "
                         "parallel). Set the learning rate yourself (QuAILoRAConfig(lr_scale=<number>)).")
    layers, params = _adapter_parameters(model, adapter_name)
    sequences = _sequences(batches, max_sequences, params[0].device, max_length)
    fewest = len(sequences)
    if is_distributed():  # every process decides alike
        count = torch.tensor([fewest], dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        fewest = int(count.item())
    if fewest < 2:
        raise TooFewSequencesError(
            f"The first step needs at least two calibration sequences of two tokens or more on every process (one to "
            f"take the step on, one to measure it on); got {fewest}. Give more calibration data, or set lr_scale to "
            "a number."
        )
    # the step is taken on every other sequence and measured on the rest: measured on the sequences it was taken on,
    # it read 3.6-9x larger on SmolLM2-135M than on text it did not see (bench/RESULTS.md, issue 36)
    step_on, measure_on = sequences[0::2], sequences[1::2]
    was_training = model.training
    model.eval()
    try:
        grads = run_on_every_process(lambda: _gradient(model, params, step_on), "the first-step gradient")
        if is_distributed():  # DDP's first step follows the gradient summed over processes
            for total in grads:
                torch.distributed.all_reduce(total)
        signs = [torch.sign(total) for total in grads]
        del grads
        totals = run_on_every_process(
            lambda: _kl_sums(model, layers, adapter_name, params, signs, measure_on, learning_rate, scales),
            "the first-step KL")
    finally:
        model.train(was_training)
    *sums, tokens = _all_reduce(totals)
    return FirstStep(learning_rate, sums[0] / tokens, {s: v / tokens for s, v in zip(scales, sums[1:])}, int(tokens))


def _gradient(model, params, sequences) -> list[torch.Tensor]:
    """The gradient of the summed token loss over `sequences` (float32), by `torch.autograd.grad`: no `.grad`."""
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with torch.enable_grad():
        for sequence in sequences:
            logits = model(**sequence).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, sequence["input_ids"][0, 1:], reduction="sum")
            for total, grad in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if grad is not None:
                    total += grad.float()
    return grads


def _kl_sums(model, layers, adapter_name, params, signs, sequences, learning_rate, scales) -> list[float]:
    """Summed KL(start ‖ adapter off) and KL(start ‖ stepped at each scale) over `sequences`, then their tokens."""
    sums, tokens = [0.0] * (1 + len(scales)), 0
    with torch.no_grad():
        for sequence in sequences:
            start = _log_probs(model, sequence)
            with _adapter_off(layers, adapter_name):
                sums[0] += _kl_sum(start, _log_probs(model, sequence))
            for i, scale in enumerate(scales, start=1):
                with _stepped(params, signs, learning_rate * scale):
                    sums[i] += _kl_sum(start, _log_probs(model, sequence))
            tokens += start.shape[0]
    return [*sums, float(tokens)]


def quailora_lr_scale(
    model: torch.nn.Module,
    batches,
    learning_rate: float,
    budget: float = DEFAULT_BUDGET,
    min_scale: float = DEFAULT_MIN_SCALE,
    max_sequences: int = 8,
    adapter_name: str = "default",
    max_length: int | None = None,
) -> tuple[float, FirstStep]:
    """The largest of 1, 1/2, 1/4, ... (down to `min_scale`) at which Adam's first step moves the start's predictions
    by at most `budget` × its own correction (see the module): `(scale, measurement)`.

    Args:
        model, batches, learning_rate, max_sequences, adapter_name, max_length: as for `quailora_first_step`.
        budget (`float`, defaults to 0.5): the largest S / C allowed (fitted to two models: see the module).
        min_scale (`float`, defaults to 0.125): the smallest factor tried.

    Returns:
        `(scale, FirstStep)`: `min_scale` when even that step is larger than the budget (check
        `measurement.ratio(scale) > budget`), and 1 when the adapter makes no correction (C = 0: nothing to keep).

    Raises:
        ValueError: `budget` not positive, `min_scale` not in (0, 1], and what `quailora_first_step` raises.

    Example:

    ```python
    batches = make_calibration_batches(texts, tokenizer, 8, 256)
    scale, step = quailora_lr_scale(model, batches, learning_rate=2e-4)  # after quailora_init(model, ...)
    ```
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"`budget` ({budget!r}) must be a positive number.")
    if not (0 < min_scale <= 1):
        raise ValueError(f"`min_scale` ({min_scale!r}) must lie in (0, 1].")
    scales = [1.0]
    while scales[-1] / 2 >= min_scale * (1 - 1e-9):
        scales.append(scales[-1] / 2)
    measured = quailora_first_step(model, batches, learning_rate, scales, max_sequences, adapter_name, max_length)
    if measured.correction_kl <= 0:
        return 1.0, measured
    for scale in scales:
        if measured.step_kl[scale] <= budget * measured.correction_kl:
            return scale, measured
    return scales[-1], measured


def parse_lr_scale(value) -> float | None:
    """`QuAILoRAConfig.lr_scale` → a positive finite multiplier, or None for `"auto"`.

    Args:
        value: `"auto"` (any case), a positive number, or its string (as a command-line parser gives it).

    Returns:
        The multiplier, or `None` for `"auto"`.

    Raises:
        ValueError: anything else (zero, negative, not finite, a bool, None, another string).

    Example:

    ```python
    parse_lr_scale("0.5")  # 0.5; parse_lr_scale("auto") is None
    ```
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"`lr_scale` ({value!r}) must be 'auto' (halve the learning rate until Adam's first step stays within "
            "the start's correction; quailora/first_step.py) or a positive number that multiplies it (1: unchanged)."
        )
    return scale


SCALED_MARK = "quailora_lr_scale"  # kept in each scaled parameter group (and so in checkpoints): never scaled twice


def scale_learning_rate(optimizer, lr_scheduler, scale: float) -> bool:
    """Multiply the learning rate of every parameter group of a created `optimizer` (and the base rates its
    `lr_scheduler` computes from) by `scale`, before the first step, once: a group already scaled (a second
    `trainer.train()` on the same optimizer, a restored checkpoint) is left alone.

    Args:
        optimizer: a torch optimizer (or a wrapper with `param_groups`).
        lr_scheduler: its scheduler, or `None`. torch's `LRScheduler`s (`base_lrs`) and `ReduceLROnPlateau` follow.
        scale (`float`): the multiplier.

    Returns:
        Whether anything was scaled.

    Raises:
        ValueError: another scheduler without `base_lrs` (e.g. one a DeepSpeed config defines), whose rates could not
            follow; nothing is changed then.

    Example:

    ```python
    scale_learning_rate(trainer.optimizer, trainer.lr_scheduler, 0.5)
    ```
    """
    plateau = isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if lr_scheduler is not None and not plateau and not hasattr(lr_scheduler, "base_lrs"):
        raise ValueError(
            f"QuAILoRA's `lr_scale` cannot scale the rates of a {type(lr_scheduler).__name__} (no `base_lrs`); set "
            "`lr_scale=1` and lower the learning rate yourself."
        )
    todo = [i for i, group in enumerate(optimizer.param_groups) if SCALED_MARK not in group]
    for i in todo:
        group = optimizer.param_groups[i]
        group["lr"] = group["lr"] * scale
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * scale
        group[SCALED_MARK] = scale
        if lr_scheduler is not None and not plateau:
            lr_scheduler.base_lrs[i] = lr_scheduler.base_lrs[i] * scale
    if lr_scheduler is not None and hasattr(lr_scheduler, "_last_lr"):
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return bool(todo)

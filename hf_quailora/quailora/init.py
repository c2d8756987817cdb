"""QuAILoRA: quantization-aware, calibrated initialisation of LoRA on a quantized base (bitsandbytes by default).

Reference: Lawton et al., "QuAILoRA: Quantization-Aware Initialization for LoRA", 2024; closed form as in
CLoQ (2025). methods.md §1 states the contract:

    minimise over A, B:  ‖X (W − Q − sBA)ᵀ‖²_F = tr[(E − sBA) H (E − sBA)ᵀ],   E = W − Q,  H = XᵀX

so that the starting model `Q + sBA` reproduces the full-precision model on calibration activations, while Q
stays exactly the quantized weight and fine-tuning memory is unchanged.

Example:

```python
from peft import LoraConfig, get_peft_model
from hf_quailora import QuAILoRAConfig, quailora_init
from hf_quailora import load_quantized_model

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
report = quailora_init(model, c4_texts, QuAILoRAConfig(calibration_samples=32, calibration_length=256),
                       tokenizer=tokenizer)
print(report.to_markdown())
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .._peft_utils import record_adapter_facts, require_lora_layers
from ..quantization import (
    dequantize_weight,
    describe_backend_layers,
    prepare_for_exact_weights,
    quantization_kind,
    why_not_quantized,
)
from .calibration import GramStatistics, check_dtype, equalize_batch_counts, make_calibration_batches
from .config import QuAILoRAConfig
from .placement import choose_placement, solve_groups
from .report import LayerReport, QuAILoRAReport
from .schedule import Schedule, plan_schedule
from .sharded import check_shardable, is_fsdp2_sharded, run_on_every_process, solve_layer_everywhere, write_factors
from .solvers import calibrated_errors, frobenius_error, solve_als, solve_closed_form, solve_svd, split_for_lora
from .streaming import stream_statistics
from .weights import FullPrecisionWeights


logger = logging.getLogger(__name__)


def _default_weight_source(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "Cannot tell where the full-precision weights are: the model has no `name_or_path`. Pass "
            "`full_precision_weights` (a checkpoint folder, a Hub id, or a state dict kept before quantization)."
        )
    return name


@dataclass
class _Plan:
    name: str
    module: torch.nn.Module
    kind: str
    rank: int
    scaling: float
    shape: tuple[int, int]


def _plan_layers(model, adapter_name: str, weights: FullPrecisionWeights | None) -> tuple[list[_Plan], dict]:
    layers = require_lora_layers(model, adapter_name)
    plans, skipped = [], {}
    for name, module in layers.items():
        base = module.get_base_layer()
        kind = quantization_kind(base)
        if kind is None:
            reason = why_not_quantized(base, getattr(module, "parameter_name", None))
            skipped[name] = f"not quantized ({reason}); E = 0, left at peft's initialisation"
            continue
        if module.use_dora.get(adapter_name, False):
            raise ValueError(f"{name}: QuAILoRA does not support DoRA; set use_dora=False.")
        if module.lora_bias.get(adapter_name, False):
            raise ValueError(f"{name}: QuAILoRA does not support lora_bias; set lora_bias=False.")
        out_features, in_features = module.out_features, module.in_features
        rank = module.r[adapter_name]
        if rank > min(out_features, in_features):
            raise ValueError(
                f"{name}: LoRA rank {rank} exceeds what a {out_features}×{in_features} layer allows "
                f"({min(out_features, in_features)}); lower `r` or exclude the layer."
            )
        if weights is not None:
            shape = weights.shape(name)
            if shape is None:
                raise ValueError(
                    f"{name}: no full-precision weight in {weights.description} (looked for "
                    f"'{name.replace('base_model.model.', '')}.weight', its suffixes, and the keys the model's "
                    "conversion mapping renames or fuses into it); pass `full_precision_weights` that match the model."
                )
            if tuple(shape) != (out_features, in_features):
                raise ValueError(
                    f"{name}: the full-precision weight has shape {tuple(shape)}, the layer {out_features}×"
                    f"{in_features}; the checkpoint does not match the model."
                )
        plans.append(_Plan(name, module, kind, rank, float(module.scaling[adapter_name]), (out_features, in_features)))
    if not plans:
        raise ValueError(
            f"No LoRA layer of this model has a quantized base ({describe_backend_layers()}), so there is no "
            f"quantization error to correct (E = 0). {_first_reason(layers)}. QuAILoRA needs a quantized base, e.g. "
            "loaded with a BitsAndBytesConfig (4-bit or 8-bit); a family whose layers transformers does not quantize "
            "cannot use it."
        )
    return plans, skipped


def _first_reason(layers: dict) -> str:
    name, module = next(iter(layers.items()))
    reason = why_not_quantized(module.get_base_layer(), getattr(module, "parameter_name", None))
    return f"The base of {name.removeprefix('base_model.model.')}: {reason}"


def _like_parameters(module, adapter_name: str, lora_B: torch.Tensor, lora_A: torch.Tensor, stay: bool = False):
    """The factors cast to their parameters' dtype (and device, unless `stay`: solved on the CPU, they wait there) now,
    not at the final write: the pending factors then cost one adapter's bytes, not the solve dtype's."""
    B_param, A_param = module.lora_B[adapter_name].weight, module.lora_A[adapter_name].weight
    return (lora_B.to(device=lora_B.device if stay else B_param.device, dtype=B_param.dtype),
            lora_A.to(device=lora_A.device if stay else A_param.device, dtype=A_param.dtype))


def _revive_dead_components(B: torch.Tensor, A: torch.Tensor, gains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Components with no gain would have A = B = 0 and never train; give them peft's default (random A, B = 0)."""
    dead = gains <= gains.max() * 1e-12 if gains.numel() else gains.bool()
    if dead.any():
        fresh = torch.empty(int(dead.sum()), A.shape[1], dtype=A.dtype, device=A.device)
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        A, B = A.clone(), B.clone()
        A[dead] = fresh
        B[:, dead] = 0
    return B, A


def _check_calibration(model, calibration, plans: list[_Plan], tokenizer, config: QuAILoRAConfig):
    """Normalise the calibration input before any model runs: batches, precomputed statistics, or nothing (SVD)."""
    if isinstance(calibration, GramStatistics):  # precomputed: reuse across adapters / ranks
        missing = [plan.name for plan in plans if plan.name not in calibration.groups]
        if missing:
            raise ValueError(f"The given GramStatistics lack layers {missing[:3]}; collect them on this model.")
        return calibration
    if calibration is not None:
        # an id beyond the vocabulary would fail deep inside the embedding lookup: checked here, with the model's size
        vocab_size = getattr(model.get_input_embeddings(), "num_embeddings", None)
        # the same number of forwards on every process: a sharded forward's collectives must all meet
        return equalize_batch_counts(lambda: make_calibration_batches(
            calibration, tokenizer, config.calibration_samples, config.calibration_length,
            config.calibration_batch_size, vocab_size=vocab_size,
        ), next(model.parameters()).device)
    if config.solver != "svd":
        raise ValueError(f"The {config.solver!r} solver needs calibration data; pass `calibration` or use 'svd'.")
    return None


def _prepare(model, calibration, config, tokenizer, full_precision_weights, adapter_name):
    """Step 1: find the LoRA layers, their quantized bases and full-precision weights, the calibration groups
    within the memory budget; check everything."""
    check_shardable(model)  # FSDP1, ZeRO-3, meta weights: refused before any work (FSDP2 is taken)

    def plan():  # local work: a failure on one process raises on all, before any collective
        source = full_precision_weights if full_precision_weights is not None else _default_weight_source(model)
        weights = FullPrecisionWeights.from_any(source).use_key_mapping(model)
        return weights, *_plan_layers(model, adapter_name, weights)

    weights, plans, skipped = run_on_every_process(plan, "planning the QuAILoRA init")
    for name, reason in skipped.items():
        logger.info("QuAILoRA skips %s: %s", name, reason)
    prepare_for_exact_weights(model)  # calibration runs in eval mode without gradients; Q must stay exact
    for plan in plans:
        if not torch.isfinite(dequantize_weight(plan.module.get_base_layer())).all():
            raise ValueError(f"{plan.name}: the dequantized weight Q is not finite.")
    calibration = _check_calibration(model, calibration, plans, tokenizer, config)
    placement = choose_placement(config, model, [(*plan.shape, plan.rank) for plan in plans])  # logs "auto"
    schedule = Schedule("off", [[plan.name for plan in plans]], solve_device=placement.solve_device)
    if calibration is not None and not isinstance(calibration, GramStatistics):
        in_features = {plan.name: plan.shape[1] for plan in plans}
        schedule = plan_schedule(model, in_features, config, placement)  # the budget, the check and the devices
    return weights, plans, skipped, calibration, schedule


@contextlib.contextmanager
def _calibration_mode(model):
    """The quantized model as it runs for calibration: adapters disabled, eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def _statistics_per_group(model, calibration, plans: list[_Plan], schedule: Schedule, config: QuAILoRAConfig,
                          report: QuAILoRAReport):
    """Step 2, a group at a time: yields `(stats, plans of the group)`; timing calibration into `report`."""
    if calibration is None or isinstance(calibration, GramStatistics):  # SVD, or statistics given
        yield calibration, plans
        return
    dtype = getattr(torch, config.gram_dtype)
    check_dtype(dtype)
    modules = {plan.name: plan.module for plan in plans}
    with _calibration_mode(model):
        groups = stream_statistics(model, calibration, modules, schedule, dtype, config.show_progress)
        while True:
            started = time.perf_counter()
            stats = next(groups, None)
            report.calibration_seconds += time.perf_counter() - started
            if stats is None:
                return
            yield stats, [plan for plan in plans if plan.name in stats.groups]  # in the model's order
            del stats  # the group's matrices go before the next group's are collected


def _solve_layer(plan: _Plan, weights: FullPrecisionWeights, stats: GramStatistics | None, config: QuAILoRAConfig,
                 device: torch.device | None = None, dequantize=dequantize_weight):
    """Step 3, one layer: `E = W − Q`, the solver's sorted product `sBA`, LoRA's factors and the report's errors
    (on `device`; `None`: where the layer lives). `dequantize(layer)` gives Q (gathered already when sharded)."""
    started = time.perf_counter()
    solve_dtype = getattr(torch, config.solve_dtype)
    # E = W − Q in one tensor: W is copied (never the caller's state dict) and Q subtracted in place, so the
    # workspace holds E, not W, Q and E. Solve where the layer lives.
    Q = dequantize(plan.module.get_base_layer()).to(device=device, dtype=solve_dtype)
    E = weights.get(plan.name).to(device=Q.device, dtype=solve_dtype, copy=True)
    if not torch.isfinite(E).all():
        raise ValueError(f"{plan.name}: the full-precision weight W is not finite.")
    E.sub_(Q)
    del Q
    # H unnormalised (no copy): the solution does not depend on its scale (damping is relative to its diagonal);
    # the report's errors are divided by the token count.
    # The closed form takes H in the Gram dtype and casts only its damped copy; the report's H (solve dtype) is made
    # after the solve, once the Cholesky factor is gone: at most two in×in matrices in the solve dtype at once.
    H = stats.for_layer(plan.name).to(device=E.device) if stats else None
    if H is not None and config.solver != "closed_form":
        H = H.to(solve_dtype)
    svd = solve_svd(E, plan.rank) if config.solver != "closed_form" or config.report_svd_baseline else None
    if config.solver == "closed_form":
        result = solve_closed_form(E, H, plan.rank, config.damping)
    elif config.solver == "als":
        result = solve_als(E, H, plan.rank, config.als_iterations, config.damping, start=(svd.B, svd.A))
    else:
        result = svd
    B, A = _revive_dead_components(*result)
    lora_B, lora_A = split_for_lora(B, A, plan.scaling)
    if not (torch.isfinite(lora_B).all() and torch.isfinite(lora_A).all()):
        raise ValueError(f"{plan.name}: the solution is not finite; raise `damping`.")
    seconds = time.perf_counter() - started
    H = H.to(solve_dtype) if H is not None else None
    return lora_B, lora_A, _layer_report(plan, E, H, stats.num_tokens if stats else 1, svd, lora_B, lora_A, seconds)


def _layer_report(plan: _Plan, E, H, num_tokens: int, svd, lora_B, lora_A, seconds: float) -> LayerReport:
    """Errors of the product actually written (`M = s·lora_B·lora_A`), with the undamped H, per calibration token."""
    M_B, M_A = lora_B * plan.scaling, lora_A
    pairs = [None, (M_B, M_A)] + ([(svd.B, svd.A)] if svd is not None else [])  # E·H by chunks of rows
    errors = [float(error) / num_tokens for error in calibrated_errors(E, H, pairs)] if H is not None else []
    qlora, result, svd_error = (errors + [None] * 3)[:3]

    return LayerReport(
        name=plan.name,
        quantization=plan.kind,
        shape=plan.shape,
        rank=plan.rank,
        scaling=plan.scaling,
        calibrated_error_qlora=qlora,
        calibrated_error_svd=svd_error,
        calibrated_error_result=result,
        frobenius_error_qlora=float(frobenius_error(E)),
        frobenius_error_svd=float(frobenius_error(E, svd.B, svd.A)) if svd is not None else None,
        frobenius_error_result=float(frobenius_error(E, M_B, M_A)),
        seconds=seconds,
    )


def quailora_init(
    model: torch.nn.Module,
    calibration=None,
    config: QuAILoRAConfig | None = None,
    *,
    tokenizer=None,
    full_precision_weights=None,
    adapter_name: str = "default",
) -> QuAILoRAReport:
    """Initialise every LoRA layer on a quantized base so that `Q + sBA` matches `W` on calibration activations.

    Steps: (1) *plan*: find the LoRA layers, their quantized bases and their full-precision weights, group the
    decoder blocks within the memory budget, and check everything before any model runs; (2) *calibrate* a group
    of blocks: run the calibration data through the quantized model (adapters disabled; by block replay or one
    pass per group, see `QuAILoRAConfig.streaming`) and collect one Gram matrix per distinct layer input of the
    group; (3) *solve* the group: per layer, form `E = W − Q` from the real quant state (W streamed one tensor at a
    time), solve for the product `sBA`, sort its components, and compute the report's errors; then free the
    group's matrices and go on with the next group; (4) *write* all factors in place with `param.data.copy_()`,
    only after every layer succeeded. When it returns, no Gram matrix, W, Q or E is referenced (unless
    `keep_gram_statistics=True`).

    Args:
        model (`peft.PeftModel` or a model with peft LoRA layers): quantized base (bitsandbytes or another backend).
            A model sharded by FSDP2 (`fully_shard`, `DistributedConfig`) is initialised in place: call this on
            every process, each with its share of the calibration data (`quailora/sharded.py`).
        calibration: token ids, texts, a `datasets.Dataset`, or batches (see `make_calibration_batches`); or
            `GramStatistics` from an earlier `collect_gram_matrices` / `report.gram_statistics` on the same model
            (to initialise several adapters or ranks from one calibration pass); may be `None` only with
            `solver="svd"`.
        config (`QuAILoRAConfig`, *optional*): settings; defaults to `QuAILoRAConfig()`.
        tokenizer (*optional*): needed when `calibration` is text.
        full_precision_weights (*optional*): a checkpoint folder, a Hub id, or a state dict kept from before
            quantization; defaults to the checkpoint the model was loaded from (`name_or_path`).
        adapter_name (`str`, defaults to `"default"`): the LoRA adapter to initialise.

    Returns:
        `QuAILoRAReport` with per-layer calibrated / Frobenius errors of the QLoRA (B = 0) start, the SVD start and
        the result; errors are normalised per calibration token.

    Raises:
        ValueError: no LoRA layers; no quantized base; a rank too large for a layer; `W` missing or of the wrong
            shape; an empty calibration set or one without non-padding tokens; non-finite W, Q or Gram matrix;
            under `torch.distributed`, a model sharded by FSDP1, ZeRO-3, tensor parallelism or on the meta device.
        TypeError: unsupported calibration or weight-source types.

    Example:

    ```python
    report = quailora_init(peft_model, c4_texts, QuAILoRAConfig(solver="closed_form"), tokenizer=tokenizer)
    print(report.summary())
    ```
    """
    config = config if config is not None else QuAILoRAConfig()
    if not isinstance(config, QuAILoRAConfig):
        raise TypeError(f"`config` must be a QuAILoRAConfig, got {type(config).__name__}.")
    # 1. Plan, and check everything (the memory budget included) before any forward pass
    weights, plans, skipped, calibration, schedule = _prepare(
        model, calibration, config, tokenizer, full_precision_weights, adapter_name
    )
    report = QuAILoRAReport(solver=config.solver, num_tokens=0, skipped=skipped, streaming=schedule.mode)
    kept = calibration if isinstance(calibration, GramStatistics) else None
    if config.keep_gram_statistics and kept is None and calibration is not None:
        kept = GramStatistics()
    # 2. Calibrate and 3. solve, a group of blocks at a time; each group's Gram matrices are freed before the next
    results = []
    progress = tqdm(total=len(plans), desc=f"QuAILoRA {config.solver}", disable=not config.show_progress, unit="layer")
    device = schedule.solve_device  # None: each layer's own (quailora/placement.py)
    sharded = is_fsdp2_sharded(model)  # FSDP2: Q gathered, every process solves, outcomes agreed (sharded.py)
    solve = partial(solve_layer_everywhere, _solve_layer) if sharded else _solve_layer

    def solve_group(stats, group):
        return [(plan, *_like_parameters(plan.module, adapter_name, *solved[:2], stay=device is not None), solved[2])
                for plan in group for solved in [solve(plan, weights, stats, config, device)]]

    def calibrated():
        for stats, group in _statistics_per_group(model, calibration, plans, schedule, config, report):
            report.num_tokens = stats.num_tokens if stats is not None else 0
            if kept is not None and stats is not kept:
                kept.matrices.update(stats.matrices)
                kept.groups.update(stats.groups)
                kept.num_tokens = stats.num_tokens
            yield stats, group
            del stats

    # not sharded: a solve's gather of Q must not run beside calibration's collectives (same order on every process)
    overlap = device is not None and device.type == "cpu" and not isinstance(calibration, GramStatistics | None)
    overlap = overlap and not sharded
    for _, solved, seconds in solve_groups(calibrated(), solve_group, overlap and not config.keep_gram_statistics):
        for plan, lora_B, lora_A, layer_report in solved:
            results.append((plan, lora_B, lora_A))
            report.layers.append(layer_report)
            progress.update(1)
        report.solve_seconds += seconds
    progress.close()
    report.gram_statistics = kept if config.keep_gram_statistics else None
    # 4. Write, only now that every layer succeeded; every process ends with process 0's factors.
    write_factors(model, [(plan.module, lora_B, lora_A) for plan, lora_B, lora_A in results], adapter_name)
    record_adapter_facts(model, adapter_name, quailora=True)
    logger.info(report.summary())
    return report

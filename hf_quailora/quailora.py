"""QuAILoRA: quantization-aware, calibrated initialisation of LoRA on a bitsandbytes-quantized base.

Reference: Lawton et al., "QuAILoRA: Quantization-Aware Initialization for LoRA", 2024; closed form as in
CLoQ (2025). methods.md §1 states the contract:

    minimise over A, B:  ‖X (W − Q − sBA)ᵀ‖²_F = tr[(E − sBA) H (E − sBA)ᵀ],   E = W − Q,  H = XᵀX

so that the starting model `Q + sBA` reproduces the full-precision model on calibration activations, while Q
stays exactly the quantized weight and fine-tuning memory is unchanged.

Example:

```python
from peft import LoraConfig, get_peft_model
from hf_quailora import QuAILoRAConfig, quailora_init
from hf_quailora.quantization import load_quantized_model

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
report = quailora_init(model, c4_texts, QuAILoRAConfig(num_samples=32, max_length=256), tokenizer=tokenizer)
print(report.to_markdown())
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from .calibration import GramStatistics, collect_gram_matrices, make_calibration_batches
from .init_solver import (
    calibrated_error,
    frobenius_error,
    solve_als,
    solve_closed_form,
    solve_svd,
    split_for_lora,
)
from .quant_error import FullPrecisionWeights, dequantize_weight, quantization_kind
from .quantization import disable_bnb_cpu_fast_path


logger = logging.getLogger(__name__)

SOLVERS = ("closed_form", "als", "svd")


@dataclass
class QuAILoRAConfig:
    """Settings of QuAILoRA initialisation, shared by `quailora_init`, `QuAILoRAInitCallback` and the recipes.

    Parameters:
        > Calibration

        num_samples (`int`, defaults to 128): calibration sequences to run.
        max_length (`int`, defaults to 512): tokens per calibration sequence (text is truncated to it).
        batch_size (`int`, defaults to 8): calibration sequences per forward pass.
        gram_dtype (`str`, defaults to `"float64"`): accumulation dtype of the Gram matrices.

        > Solver

        solver (`str`, defaults to `"closed_form"`): `"closed_form"` (exact optimum of the calibrated objective),
            `"als"` (the paper's alternating least squares from the SVD start), or `"svd"` (uncalibrated truncated
            SVD of E, LoftQ-style with fixed Q; needs no calibration data).
        als_iterations (`int`, defaults to 20): iterations of `"als"`.
        damping (`float`, defaults to 1e-4): `H ← H + damping · mean(diag H) · I`.
        solve_dtype (`str`, defaults to `"float64"`): dtype of the solves.

        > Output

        show_progress (`bool`, defaults to `True`): progress bars over calibration batches and layers.
    """

    # Calibration
    num_samples: int | None = field(default=128, metadata={"help": "Calibration sequences to run."})
    max_length: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})
    batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    gram_dtype: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "Accumulation dtype of Gram matrices.", "choices": ["float64", "float32"]}
    )
    # Solver
    solver: Literal["closed_form", "als", "svd"] = field(
        default="closed_form", metadata={"help": "Initialisation solver.", "choices": list(SOLVERS)}
    )
    als_iterations: int = field(default=20, metadata={"help": "Iterations of the 'als' solver."})
    damping: float = field(default=1e-4, metadata={"help": "Relative damping of the Gram matrix."})
    solve_dtype: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "Dtype of the solves.", "choices": ["float64", "float32"]}
    )
    # Output
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}; got {self.solver!r}.")
        if self.num_samples is not None and (not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise ValueError(f"`num_samples` ({self.num_samples}) must be a positive integer or None (all).")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"`max_length` ({self.max_length}) must be a positive integer.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` ({self.batch_size}) must be a positive integer.")
        if not isinstance(self.als_iterations, int) or self.als_iterations < 0:
            raise ValueError(f"`als_iterations` ({self.als_iterations}) must be a non-negative integer.")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"`damping` ({self.damping}) must be a finite number >= 0.")
        for name in ("gram_dtype", "solve_dtype"):
            if getattr(self, name) not in ("float64", "float32"):
                raise ValueError(f"`{name}` must be 'float64' or 'float32'; got {getattr(self, name)!r}.")


@dataclass
class LayerReport:
    """Errors of one layer, per calibration token (calibrated) and in Frobenius norm (uncalibrated)."""

    name: str
    quantization: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    calibrated_error_qlora: float | None
    calibrated_error_svd: float | None
    calibrated_error_result: float | None
    frobenius_error_qlora: float
    frobenius_error_svd: float
    frobenius_error_result: float
    seconds: float

    @property
    def relative_calibrated_error(self) -> float | None:
        """Calibrated error of the result over QLoRA's (B = 0); below 1 is better."""
        if self.calibrated_error_result is None or not self.calibrated_error_qlora:
            return None
        return self.calibrated_error_result / self.calibrated_error_qlora


@dataclass
class QuAILoRAReport:
    """What `quailora_init` did: one `LayerReport` per initialised layer, and what it skipped."""

    solver: str
    num_tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    gram_statistics: GramStatistics | None = field(default=None, repr=False)

    def totals(self) -> dict[str, float]:
        """Errors summed over layers (calibrated errors only when calibration ran)."""
        keys = [k for k in LayerReport.__dataclass_fields__ if "error" in k]
        out = {}
        for key in keys:
            values = [getattr(layer, key) for layer in self.layers]
            if values and all(v is not None for v in values):
                out[key] = float(sum(values))
        return out

    def to_dict(self) -> dict:
        """JSON-ready dict (without the Gram matrices)."""
        return {
            "solver": self.solver,
            "num_tokens": self.num_tokens,
            "calibration_seconds": self.calibration_seconds,
            "solve_seconds": self.solve_seconds,
            "totals": self.totals(),
            "skipped": dict(self.skipped),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_markdown(self, max_rows: int | None = None) -> str:
        """A per-layer Markdown table: errors relative to QLoRA's B = 0 start (1.0 = no improvement)."""

        def rel(value, base):
            return "n/a" if value is None or not base else f"{value / base:.3f}"

        lines = [
            "| layer | quant | rank | calib. SVD | calib. result | Frob. SVD | Frob. result |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for layer in self.layers[:max_rows]:
            lines.append(
                f"| {layer.name} | {layer.quantization} | {layer.rank} "
                f"| {rel(layer.calibrated_error_svd, layer.calibrated_error_qlora)} "
                f"| {rel(layer.calibrated_error_result, layer.calibrated_error_qlora)} "
                f"| {rel(layer.frobenius_error_svd, layer.frobenius_error_qlora)} "
                f"| {rel(layer.frobenius_error_result, layer.frobenius_error_qlora)} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| … {len(self.layers) - max_rows} more layers | | | | | | |")
        totals = self.totals()
        if totals:
            lines.append(
                f"| **all layers** | | | {rel(totals.get('calibrated_error_svd'), totals.get('calibrated_error_qlora'))} "
                f"| {rel(totals.get('calibrated_error_result'), totals.get('calibrated_error_qlora'))} "
                f"| {rel(totals['frobenius_error_svd'], totals['frobenius_error_qlora'])} "
                f"| {rel(totals['frobenius_error_result'], totals['frobenius_error_qlora'])} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        totals = self.totals()
        text = (
            f"QuAILoRA ({self.solver}): {len(self.layers)} layers initialised, {len(self.skipped)} skipped, "
            f"{self.num_tokens} calibration tokens; calibration {self.calibration_seconds:.1f} s, "
            f"solves {self.solve_seconds:.1f} s"
        )
        if "calibrated_error_result" in totals and totals.get("calibrated_error_qlora"):
            text += (
                f"; calibrated error vs QLoRA start: SVD start "
                f"{totals['calibrated_error_svd'] / totals['calibrated_error_qlora']:.3f}, result "
                f"{totals['calibrated_error_result'] / totals['calibrated_error_qlora']:.3f}"
            )
        return text


def find_lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """Named peft `LoraLayer` modules of `model` that carry `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }


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
    layers = find_lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(
            f"The model has no LoRA layers with adapter {adapter_name!r}; wrap it with peft's get_peft_model "
            "(e.g. LoraConfig(target_modules='all-linear')) first."
        )
    plans, skipped = [], {}
    for name, module in layers.items():
        base = module.get_base_layer()
        kind = quantization_kind(base)
        if kind is None:
            skipped[name] = "base layer is not quantized by bitsandbytes (E = 0): left at peft's initialisation"
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
                    f"'{name.replace('base_model.model.', '')}.weight'); pass `full_precision_weights` that match "
                    "the model."
                )
            if tuple(shape) != (out_features, in_features):
                raise ValueError(
                    f"{name}: the full-precision weight has shape {tuple(shape)}, the layer {out_features}×"
                    f"{in_features}; the checkpoint does not match the model."
                )
        plans.append(_Plan(name, module, kind, rank, float(module.scaling[adapter_name]), (out_features, in_features)))
    if not plans:
        raise ValueError(
            "No LoRA layer of this model has a bitsandbytes-quantized base, so there is no quantization error to "
            "correct (E = 0). Load the model with a BitsAndBytesConfig (4-bit or 8-bit) to use QuAILoRA."
        )
    return plans, skipped


@torch.no_grad()
def _write(module, adapter_name: str, lora_B: torch.Tensor, lora_A: torch.Tensor) -> None:
    # copy_ keeps the Parameter objects the optimizer may already hold.
    for param, value in ((module.lora_B[adapter_name].weight, lora_B), (module.lora_A[adapter_name].weight, lora_A)):
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))


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


def _broadcast_lora(plans: list[_Plan], adapter_name: str) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for plan in plans:  # every process ends with rank 0's weights, bit for bit
        for factor in (plan.module.lora_A[adapter_name].weight, plan.module.lora_B[adapter_name].weight):
            torch.distributed.broadcast(factor.data, src=0)


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

    Steps: (1) find the LoRA layers, their quantized bases and their full-precision weights, and check everything
    before any model runs; (2) run the calibration data through the quantized model (adapters disabled) and
    collect one Gram matrix per distinct layer input; (3) per layer, form `E = W − Q` from the real quant state,
    solve for the product `sBA`, sort its components, and compute the report's errors; (4) write all factors in
    place with `param.data.copy_()` (only after every layer succeeded).

    Args:
        model (`peft.PeftModel` or a model with peft LoRA layers): base quantized with bitsandbytes.
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
            shape; an empty calibration set or one without non-padding tokens; non-finite W, Q or Gram matrix.
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
    solve_dtype = getattr(torch, config.solve_dtype)
    # 1. Check everything that can be checked before running the model.
    source = full_precision_weights if full_precision_weights is not None else _default_weight_source(model)
    weights = FullPrecisionWeights.from_any(source)
    plans, skipped = _plan_layers(model, adapter_name, weights)
    for reason_name, reason in skipped.items():
        logger.info("QuAILoRA skips %s: %s", reason_name, reason)
    disable_bnb_cpu_fast_path(model)
    for plan in plans:
        Q = dequantize_weight(plan.module.get_base_layer())
        if not torch.isfinite(Q).all():
            raise ValueError(f"{plan.name}: the dequantized weight Q is not finite.")
    batches = None
    if isinstance(calibration, GramStatistics):  # precomputed: reuse across adapters / ranks
        missing = [plan.name for plan in plans if plan.name not in calibration.groups]
        if missing:
            raise ValueError(f"The given GramStatistics lack layers {missing[:3]}; collect them on this model.")
    elif calibration is not None:
        batches = make_calibration_batches(
            calibration, tokenizer, config.num_samples, config.max_length, config.batch_size
        )
    elif config.solver != "svd":
        raise ValueError(f"The {config.solver!r} solver needs calibration data; pass `calibration` or use 'svd'.")

    # 2. Gram matrices of the quantized model's layer inputs (adapters off, eval mode, no dropout).
    report = QuAILoRAReport(solver=config.solver, num_tokens=0, skipped=skipped)
    stats = calibration if isinstance(calibration, GramStatistics) else None
    if stats is not None:
        report.num_tokens = stats.num_tokens
    if batches is not None:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
            with disable:
                stats = collect_gram_matrices(
                    model,
                    batches,
                    {plan.name: plan.module for plan in plans},
                    dtype=getattr(torch, config.gram_dtype),
                    show_progress=config.show_progress,
                )
        finally:
            model.train(was_training)
        report.num_tokens = stats.num_tokens
        report.calibration_seconds = time.perf_counter() - started

    report.gram_statistics = stats
    # 3. Solve per layer.
    started = time.perf_counter()
    results = []
    for plan in tqdm(plans, desc=f"QuAILoRA {config.solver}", disable=not config.show_progress, unit="layer"):
        layer_start = time.perf_counter()
        Q = dequantize_weight(plan.module.get_base_layer()).to(solve_dtype)  # solve where the layer lives
        W = weights.get(plan.name).to(device=Q.device, dtype=solve_dtype)
        if not torch.isfinite(W).all():
            raise ValueError(f"{plan.name}: the full-precision weight W is not finite.")
        E = W - Q
        H = stats.for_layer(plan.name).to(device=E.device, dtype=solve_dtype) / stats.num_tokens if stats else None
        B_svd, A_svd, svd_gains = solve_svd(E, plan.rank)
        if config.solver == "closed_form":
            B, A, gains = solve_closed_form(E, H, plan.rank, config.damping)
        elif config.solver == "als":
            B, A, gains = solve_als(E, H, plan.rank, config.als_iterations, config.damping, start=(B_svd, A_svd))
        else:
            B, A, gains = B_svd, A_svd, svd_gains
        B, A = _revive_dead_components(B, A, gains)
        lora_B, lora_A = split_for_lora(B, A, plan.scaling)
        if not (torch.isfinite(lora_B).all() and torch.isfinite(lora_A).all()):
            raise ValueError(f"{plan.name}: the solution is not finite; raise `damping`.")
        results.append((plan, lora_B, lora_A))
        # Report errors of the product actually written (M = s·lora_B·lora_A), with the undamped H.
        M_B, M_A = lora_B * plan.scaling, lora_A
        EH = E @ H if H is not None else None
        report.layers.append(
            LayerReport(
                name=plan.name,
                quantization=plan.kind,
                shape=plan.shape,
                rank=plan.rank,
                scaling=plan.scaling,
                calibrated_error_qlora=float(calibrated_error(E, H, EH=EH)) if H is not None else None,
                calibrated_error_svd=float(calibrated_error(E, H, B_svd, A_svd, EH=EH)) if H is not None else None,
                calibrated_error_result=float(calibrated_error(E, H, M_B, M_A, EH=EH)) if H is not None else None,
                frobenius_error_qlora=float(frobenius_error(E)),
                frobenius_error_svd=float(frobenius_error(E, B_svd, A_svd)),
                frobenius_error_result=float(frobenius_error(E, M_B, M_A)),
                seconds=time.perf_counter() - layer_start,
            )
        )
    report.solve_seconds = time.perf_counter() - started

    # 4. Write, only now that every layer succeeded; then make all processes agree.
    for plan, lora_B, lora_A in results:
        _write(plan.module, adapter_name, lora_B, lora_A)
    _broadcast_lora(plans, adapter_name)
    logger.info(report.summary())
    return report

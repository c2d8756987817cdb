"""`QuAILoRAConfig`: the settings of QuAILoRA initialisation, shared by `quailora_init`, the callback and the recipes.

Example:

```python
from hf_quailora import QuAILoRAConfig

config = QuAILoRAConfig(calibration_samples=32, calibration_length=256, solver="closed_form")
```

The calibration fields carry a `calibration_` prefix so that a recipe can parse this dataclass itself next to trl's
`SFTConfig` (whose `max_length` is the training length) in one `TrlParser`. Their former names (`num_samples`,
`max_length`, `batch_size`) are still accepted as keywords and attributes, with a `FutureWarning`
(`RENAMED_OPTIONS`); they are not fields, so they never reach a parser.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, get_args

from .first_step import parse_lr_scale
from .memory import parse_memory_budget


Solver = Literal["closed_form", "als", "svd"]
Dtype = Literal["float64", "float32"]
Streaming = Literal["auto", "replay", "passes", "off"]
GramDevice = Literal["auto", "model", "cpu"]
SolveDevice = Literal["auto", "model", "cpu"]
SOLVERS: tuple[str, ...] = get_args(Solver)
DTYPES: tuple[str, ...] = get_args(Dtype)
STREAMING_MODES: tuple[str, ...] = get_args(Streaming)
GRAM_DEVICES: tuple[str, ...] = get_args(GramDevice)
SOLVE_DEVICES: tuple[str, ...] = get_args(SolveDevice)
# Options renamed when the recipes began parsing this dataclass itself: former name -> field
RENAMED_OPTIONS = {
    "num_samples": "calibration_samples", "max_length": "calibration_length", "batch_size": "calibration_batch_size",
}


def rename_options(options: dict, stacklevel: int = 3) -> dict:
    """`options` with each former name of `RENAMED_OPTIONS` replaced by its field, with a `FutureWarning`.

    Raises:
        TypeError: a former name and its field are both given.

    Example:

    ```python
    rename_options({"num_samples": 8})  # {"calibration_samples": 8}, and a FutureWarning
    ```
    """
    renamed = dict(options)
    for old, new in RENAMED_OPTIONS.items():
        if old in renamed:
            if new in renamed:
                raise TypeError(f"`{old}` and `{new}` were both given; `{old}` is the former name: give `{new}` only.")
            warnings.warn(f"`{old}` is deprecated; use `{new}`.", FutureWarning, stacklevel=stacklevel)
            renamed[new] = renamed.pop(old)
    return renamed


def accept_renamed_options(cls):
    """Class decorator, applied after `@dataclass`: the generated `__init__` also takes `RENAMED_OPTIONS`."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **rename_options(kwargs))

    cls.__init__ = __init__
    return cls


def _renamed_attribute(old: str, new: str) -> property:
    def read(self):
        warnings.warn(f"`{old}` is deprecated; use `{new}`.", FutureWarning, stacklevel=2)
        return getattr(self, new)

    return property(read, doc=f"Deprecated, read-only: `{new}`.")


@accept_renamed_options
@dataclass
class QuAILoRAConfig:
    """Settings of QuAILoRA initialisation, shared by `quailora_init`, `QuAILoRAInitCallback` and the recipes.

    Parameters:
        > Calibration

        calibration_samples (`int`, defaults to 128): calibration sequences to run (`None`: all that are given).
            Formerly `num_samples`.
        calibration_length (`int`, defaults to 512): tokens per calibration sequence (text is truncated to it).
            Formerly `max_length`.
        calibration_batch_size (`int`, defaults to 8): calibration sequences per forward pass. Formerly
            `batch_size`.
        gram_dtype (`str`, defaults to `"float32"`): accumulation dtype of the Gram matrices. float32 halves their
            bytes and was measured to give the same start as float64 (README, "Streamed initialisation": the same
            held-out perplexity on SmolLM2-135M and Gemma-3-270m, the product BA within 6e-6); the per-batch products
            are float32 either way, computed at full float32 precision (never TF32).

        > Memory (see the README's memory contract)

        streaming (`str`, defaults to `"auto"`): how the decoder blocks are calibrated and solved, a group at a time,
            each group's Gram matrices freed before the next:
            - `"replay"` caches the hidden states at the input of the first block and runs one block at a time with
              its own forward arguments (attention masks, position embeddings), feeding its outputs to the next
              block: one forward's worth of compute;
            - `"passes"` runs the whole model once per group, with hooks on that group only (any architecture;
              one forward per group);
            - `"off"` collects every Gram matrix in one pass, all alive at once (the original design);
            - `"auto"` replays when the LoRA layers lie in one list of decoder blocks, else uses passes.
        memory_budget (`str` or `int`, defaults to `"auto"`): bytes of Gram matrices alive at once, as an integer or
            a string such as `"8GiB"` or `"500MB"`; it decides how many consecutive blocks form a group. `"auto"`:
            one block at a time when replaying (no extra compute), and as many blocks as fit in half the free
            memory of the Gram device for passes. The budget counts `in_features² × bytes` for every LoRA layer,
            not subtracting the matrices q/k/v and gate/up share, so the real peak stays below it.
        gram_device (`str`, defaults to `"auto"`): where Gram matrices accumulate: `"model"` (the device of each
            layer), `"cpu"` (for GPUs with little memory; the per-batch products are still computed on the
            layer's device, by blocks of 512 columns, each added on the CPU; replay's hidden-state cache waits on
            the CPU too), or `"auto"`: decided with `solve_device` (below). With `solve_device="cpu"` it is the
            smallest placement (docs/memory.md).
        keep_gram_statistics (`bool`, defaults to `False`): keep every Gram matrix in `report.gram_statistics` (to
            initialise several ranks from one calibration). This keeps all of them alive at once.

        > Solver

        solver (`str`, defaults to `"closed_form"`): `"closed_form"` (exact optimum of the calibrated objective),
            `"als"` (the paper's alternating least squares from the SVD start), or `"svd"` (uncalibrated truncated
            SVD of E, LoftQ-style with fixed Q; needs no calibration data).
        als_iterations (`int`, defaults to 20): iterations of `"als"`.
        damping (`float`, defaults to 1e-4): `H ← H + damping · mean(diag H) · I`.
        solve_dtype (`str`, defaults to `"float64"`): dtype of the solves. `"float32"` halves the solve's workspace;
            on the real layers of SmolLM2-135M and Gemma-3-270m its calibrated objective is within 1.001× of the
            float64 optimum (bench/RESULTS.md, issue 34).
        solve_device (`str`, defaults to `"auto"`): where the solves run: `"model"` (each layer's device), `"cpu"`
            (the solve's workspace off the GPU; each group is solved in a background thread while the next group is
            calibrated), or `"auto"`: on a CPU model, each layer's device; on a GPU, with `gram_device`, the
            cheapest placement whose estimated init peak stays under the free memory and the extra memory of a
            QLoRA fine-tuning step at batch 1 × 2048, or the run's own step under `QuAILoRAInitCallback`
            (docs/memory.md, "Where the init runs"), logged in one INFO line. A setting other than `"auto"` wins. The factors are the same wherever they are solved.
        report_svd_baseline (`bool`, defaults to `False`): also compute the uncalibrated SVD start's errors for the
            report (`calibrated_error_svd`, `frobenius_error_svd`); this doubles the per-layer work of the
            closed form (the `"als"` and `"svd"` solvers compute that SVD anyway and always report it).

        > Fine-tuning from the start

        lr_scale (`str` or `float`, defaults to `"auto"`): what `QuAILoRAInitCallback` multiplies the run's learning
            rate by once the start is written (every parameter group and the scheduler's base rates; logged; the
            training arguments keep what was asked). `"auto"`: the largest of 1, 1/2, 1/4, 1/8 at which Adam's first
            step moves the start's predictions by at most 0.5 × the start's own correction, both in KL, the step
            taken on four train sequences and measured on four others (`quailora_lr_scale`,
            quailora/first_step.py): at 2e-4, r = 64, ×1 on SmolLM2-135M and ×1/2 on Gemma-3-270m, the rates that
            kept the most of the start's lead after 40 steps (bench/RESULTS.md, issue 36). Not measured when FSDP or
            DeepSpeed wrap the model (the rate is kept, and the log says so). A number multiplies as it is; `1`
            keeps the learning rate. `quailora_init` alone never changes a learning rate.

        > Output

        show_progress (`bool`, defaults to `True`): progress bars over calibration batches and layers.
    """

    # Calibration
    calibration_samples: int | None = field(default=128, metadata={"help": "Calibration sequences to run."})
    calibration_length: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    gram_dtype: Dtype = field(
        default="float32", metadata={"help": "Accumulation dtype of Gram matrices.", "choices": list(DTYPES)}
    )
    # Memory
    streaming: Streaming = field(
        default="auto",
        metadata={"help": "Calibrate and solve a group of blocks at a time.", "choices": list(STREAMING_MODES)},
    )
    memory_budget: str = field(
        default="auto", metadata={"help": "Bytes of Gram matrices alive at once ('auto', an integer, or e.g. '8GiB')."}
    )
    gram_device: GramDevice = field(
        default="auto", metadata={"help": "Where Gram matrices accumulate.", "choices": list(GRAM_DEVICES)}
    )
    keep_gram_statistics: bool = field(
        default=False, metadata={"help": "Keep every Gram matrix in the report (all alive at once)."}
    )
    # Solver
    solver: Solver = field(
        default="closed_form", metadata={"help": "Initialisation solver.", "choices": list(SOLVERS)}
    )
    als_iterations: int = field(default=20, metadata={"help": "Iterations of the 'als' solver."})
    damping: float = field(default=1e-4, metadata={"help": "Relative damping of the Gram matrix."})
    solve_dtype: Dtype = field(
        default="float64", metadata={"help": "Dtype of the solves.", "choices": list(DTYPES)}
    )
    solve_device: SolveDevice = field(
        default="auto", metadata={"help": "Where the solves run.", "choices": list(SOLVE_DEVICES)}
    )
    report_svd_baseline: bool = field(
        default=False, metadata={"help": "Also report the uncalibrated SVD start's errors (doubles closed-form work)."}
    )
    # Fine-tuning from the start
    lr_scale: str = field(
        default="auto", metadata={"help": "Multiply the learning rate after the init: 'auto' (halve until the first "
                                          "step stays within 0.5 x the start's correction) or a number (1: keep)."}
    )
    # Output
    show_progress: bool = field(default=True, metadata={"help": "Progress bars of the calibration and the solves."})

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}; got {self.solver!r}.")
        samples = self.calibration_samples
        if samples is not None and (not isinstance(samples, int) or samples < 1):
            raise ValueError(f"`calibration_samples` ({samples}) must be a positive integer or None (all).")
        for name in ("calibration_length", "calibration_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` ({getattr(self, name)}) must be a positive integer.")
        if not isinstance(self.als_iterations, int) or self.als_iterations < 0:
            raise ValueError(f"`als_iterations` ({self.als_iterations}) must be a non-negative integer.")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"`damping` ({self.damping}) must be a finite number >= 0.")
        for name in ("gram_dtype", "solve_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"`{name}` must be one of {DTYPES}; got {getattr(self, name)!r}.")
        if self.streaming not in STREAMING_MODES:
            raise ValueError(f"`streaming` must be one of {STREAMING_MODES}; got {self.streaming!r}.")
        if self.solve_device not in SOLVE_DEVICES:
            raise ValueError(
                f"`solve_device` must be one of {SOLVE_DEVICES} ('auto': the model's device unless the init would "
                f"then need more than fine-tuning or than is free, else the CPU); got {self.solve_device!r}."
            )
        if self.gram_device not in GRAM_DEVICES:
            raise ValueError(
                f"`gram_device` must be one of {GRAM_DEVICES} ('auto', the layer's own device, or the CPU); got "
                f"{self.gram_device!r}."
            )
        parse_lr_scale(self.lr_scale)
        self.memory_budget_bytes  # parsed here, so that a bad budget fails before any work

    @property
    def memory_budget_bytes(self) -> int | None:
        """`memory_budget` in bytes (`None` for `"auto"`), parsed once and kept while `memory_budget` is unchanged.

        Raises:
            ValueError / TypeError: a budget `parse_memory_budget` refuses.
        """
        parsed = self.__dict__.get("_parsed_memory_budget")
        if parsed is None or parsed[0] is not self.memory_budget:
            parsed = (self.memory_budget, parse_memory_budget(self.memory_budget))
            self.__dict__["_parsed_memory_budget"] = parsed
        return parsed[1]

    # Former names, read-only (not fields: a parser never sees them)
    num_samples = _renamed_attribute("num_samples", "calibration_samples")
    max_length = _renamed_attribute("max_length", "calibration_length")
    batch_size = _renamed_attribute("batch_size", "calibration_batch_size")

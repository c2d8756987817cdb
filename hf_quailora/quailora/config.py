"""`QuAILoRAConfig`: the settings of QuAILoRA initialisation, shared by `quailora_init`, the callback and the recipes.

Example:

```python
from hf_quailora import QuAILoRAConfig

config = QuAILoRAConfig(num_samples=32, max_length=256, solver="closed_form")
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args


Solver = Literal["closed_form", "als", "svd"]
Dtype = Literal["float64", "float32"]
SOLVERS: tuple[str, ...] = get_args(Solver)
DTYPES: tuple[str, ...] = get_args(Dtype)


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
    gram_dtype: Dtype = field(
        default="float64", metadata={"help": "Accumulation dtype of Gram matrices.", "choices": list(DTYPES)}
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
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"`{name}` must be one of {DTYPES}; got {getattr(self, name)!r}.")

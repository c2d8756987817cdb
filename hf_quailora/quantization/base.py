"""What hf_quailora asks of a quantization backend: one `QuantizationBackend` value per library (torch only).

A backend answers, for one layer, which kind of quantized layer it is and the exact weight `Q` its forward pass
uses; for a model, how to keep `Q` exact through no-grad passes; and, for error messages and the memory estimate,
why a layer was left unquantized and what one weight costs. `hf_quailora.quantization` walks the registered backends
in order, as peft's `dequantize_module_weight` (`src/peft/utils/integrations.py`) tries one branch per backend.

Example:

```python
from hf_quailora.quantization import QuantizationBackend, register_backend

register_backend(QuantizationBackend(
    name="mylib", kinds=("int4",), layer_description="a mylib QuantLinear layer",
    kind=lambda layer: "int4" if isinstance(layer, QuantLinear) else None,
    dequantize=lambda layer: layer.codes.float() * layer.scale,
))
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _always_available() -> bool:
    return True


def _nothing_to_prepare(model: torch.nn.Module) -> int:
    return 0


def _no_explanation(layer: torch.nn.Module, parameter_name: str | None = None) -> str | None:
    return None


@dataclass(frozen=True)
class QuantizationBackend:
    """One quantization library, as hf_quailora sees it: a name, the kinds it records, and its hooks.

    A second backend is one module that ends in such a value, plus one entry in
    `hf_quailora.quantization.BACKENDS` (or a `register_backend` call).

    Parameters:
        name (`str`): the library, e.g. `"bitsandbytes"`.
        kinds (`tuple[str, ...]`): every kind `kind` can return; they may be recorded as the base quantization in
            `dynamic_rank.json`, so they must not clash with another backend's kinds or with `"none"`.
        layer_description (`str`): its layers in words, with an article, for error messages, e.g.
            `"a bitsandbytes Linear4bit/Linear8bitLt layer"`.
        kind (`Callable[[nn.Module], str | None]`): the layer's kind (one of `kinds`), `None` for a layer that
            is not this backend's.
        dequantize (`Callable[[nn.Module], torch.Tensor]`): the exact weight `Q` the layer's forward uses, float32,
            out×in, on the layer's device; called only on layers whose `kind` is not `None`.
        is_available (`Callable[[], bool]`, *optional*): whether the library is installed; when it is not,
            `kind` and `prepare_for_exact_weights` are not called. Defaults to always.
        prepare_for_exact_weights (`Callable[[nn.Module], int]`, *optional*): turn off whatever would change the
            stored weights during no-grad passes (bitsandbytes' CPU fast path); returns the number of layers
            concerned. Defaults to nothing to do.
        why_not_quantized (`Callable[[nn.Module, str | None], str | None]`, *optional*): why this library's loader
            left a layer (or its parameter) unquantized; `None`: no opinion. Defaults to no opinion.
        bits_per_weight (`Mapping[str, float]`, *optional*): the storage cost of one base weight per kind, for the
            memory estimate (`hf_quailora.quailora.memory`).
    """

    name: str
    kinds: tuple[str, ...]
    layer_description: str
    kind: Callable[[torch.nn.Module], str | None]
    dequantize: Callable[[torch.nn.Module], torch.Tensor]
    is_available: Callable[[], bool] = _always_available
    prepare_for_exact_weights: Callable[[torch.nn.Module], int] = _nothing_to_prepare
    why_not_quantized: Callable[[torch.nn.Module, str | None], str | None] = _no_explanation
    bits_per_weight: Mapping[str, float] = field(default_factory=dict)


__all__ = ["QuantizationBackend"]

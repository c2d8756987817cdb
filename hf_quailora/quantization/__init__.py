"""The quantization seam: which backend quantized a layer, its exact weight `Q`, and how to keep `Q` exact.

Every question about a quantized layer walks `BACKENDS` in order and takes the first backend that claims the layer,
as peft's `dequantize_module_weight` (`src/peft/utils/integrations.py`) tries one branch per backend and
`src/peft/tuners/lora/{bnb,gptq,hqq,torchao}.py` keep one file per backend. A second backend is one new module
ending in a `QuantizationBackend` (`base.py`), plus one entry in `BACKENDS` (or a `register_backend` call).

| Module | Holds |
| --- | --- |
| `base.py` | `QuantizationBackend`: what a backend answers (kind, exact `Q`, preparation, explanations, bits) |
| `bnb.py` | bitsandbytes: NF4/FP4/int8 kinds and `Q`, `disable_bnb_cpu_fast_path`, `make_bnb_config`, `BNB_BACKEND` |
| `loading.py` | `load_quantized_model` and its choices (`LOAD_QUANTIZATIONS`) |

Two lists of names are kept apart: `LOAD_QUANTIZATIONS` is what `load_quantized_model` (and the CLI's
`--quantization`) can load; `recorded_quantizations()` is what a layer can report and `dynamic_rank.json` can record
as the base (every registered backend's kinds, and `"none"`).

Example:

```python
from hf_quailora.quantization import dequantize_weight, load_quantized_model, quantization_kind

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
layer = model.model.layers[0].mlp.down_proj
quantization_kind(layer), dequantize_weight(layer).shape  # ("nf4", (576, 1536))
```
"""

from __future__ import annotations

import torch

from .base import QuantizationBackend
from .bnb import (
    BNB_BACKEND,
    BNB_QUANTIZATIONS,
    BnbQuantization,
    describe_bnb_config,
    disable_bnb_cpu_fast_path,
    make_bnb_config,
    quiet_bnb_warnings,
)
from .loading import LOAD_QUANTIZATIONS, LoadQuantization, load_quantized_model


# Tried in order; the first backend whose `kind` is not None owns the layer.
BACKENDS: list[QuantizationBackend] = [BNB_BACKEND]

# Older names of the loader's choice, kept for imports written before the seam.
Quantization = LoadQuantization
QUANTIZATIONS: tuple[str, ...] = LOAD_QUANTIZATIONS


def register_backend(backend: QuantizationBackend, first: bool = False) -> QuantizationBackend:
    """Add `backend` to `BACKENDS` (last, or first when `first`), so every walker below asks it too.

    Args:
        backend (`QuantizationBackend`): the backend to add.
        first (`bool`, defaults to `False`): try it before the others (for layers two backends would both claim).

    Returns:
        `QuantizationBackend`: `backend`, so that a module can end in `MY_BACKEND = register_backend(...)`.

    Raises:
        TypeError: `backend` is not a `QuantizationBackend`.
        ValueError: a backend of that name is registered already, or one of its kinds is `"none"` or another
            backend's kind (`dynamic_rank.json` could not tell them apart).

    Example:

    ```python
    register_backend(QuantizationBackend(name="mylib", kinds=("int4",), layer_description="a mylib layer",
                                         kind=my_kind, dequantize=my_dequantize))
    ```
    """
    if not isinstance(backend, QuantizationBackend):
        raise TypeError(f"`backend` must be a QuantizationBackend; got {type(backend).__name__}.")
    if any(other.name == backend.name for other in BACKENDS):
        raise ValueError(f"A quantization backend named {backend.name!r} is registered already; unregister it first.")
    taken = {kind: other.name for other in BACKENDS for kind in other.kinds} | {"none": "no quantization"}
    clashes = [f"{kind!r} ({taken[kind]})" for kind in backend.kinds if kind in taken]
    if clashes:
        raise ValueError(f"Backend {backend.name!r} reports kinds that are taken: {', '.join(clashes)}; rename them.")
    if first:
        BACKENDS.insert(0, backend)
    else:
        BACKENDS.append(backend)
    return backend


def unregister_backend(name: str) -> QuantizationBackend:
    """Remove the backend called `name` from `BACKENDS` and return it.

    Raises:
        ValueError: no backend has that name.

    Example:

    ```python
    unregister_backend("mylib")
    ```
    """
    for backend in BACKENDS:
        if backend.name == name:
            BACKENDS.remove(backend)
            return backend
    raise ValueError(f"No quantization backend named {name!r}; registered: {[b.name for b in BACKENDS]}.")


def recorded_quantizations() -> tuple[str, ...]:
    """Every kind a registered backend can report, then `"none"`: what `dynamic_rank.json` may record as the base.

    Example:

    ```python
    recorded_quantizations()  # ("nf4", "fp4", "int8", "none") with bitsandbytes alone
    ```
    """
    return tuple(kind for backend in BACKENDS for kind in backend.kinds) + ("none",)


def describe_backend_layers(conjunction: str = "or") -> str:
    """The layers of every registered backend in words, joined by `conjunction`, for error messages.

    Example:

    ```python
    describe_backend_layers()  # "a bitsandbytes Linear4bit/Linear8bitLt layer" with bitsandbytes alone
    ```
    """
    return f" {conjunction} ".join(backend.layer_description for backend in BACKENDS)


def _find_backend(layer: torch.nn.Module) -> tuple[QuantizationBackend, str] | None:
    for backend in BACKENDS:
        if backend.is_available():
            kind = backend.kind(layer)
            if kind is not None:
                return backend, kind
    return None


def quantization_kind(layer: torch.nn.Module) -> str | None:
    """The kind of a quantized layer (`"nf4"`, `"fp4"`, `"int8"` for bitsandbytes), `None` for anything else.

    Example:

    ```python
    quantization_kind(model.model.layers[0].mlp.down_proj)  # "nf4"
    ```
    """
    found = _find_backend(layer)
    return found[1] if found is not None else None


@torch.no_grad()
def dequantize_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The exact weight `Q` (out×in, float32) that a quantized layer uses in its forward pass.

    Raises:
        TypeError: no registered backend claims `layer`.
        ValueError: the backend cannot give an exact `Q` (e.g. codes repacked by bitsandbytes' CPU fast path).

    Example:

    ```python
    Q = dequantize_weight(model.model.layers[0].mlp.down_proj)
    ```
    """
    found = _find_backend(layer)
    if found is None:
        raise TypeError(f"{type(layer).__name__} is not {describe_backend_layers('nor')}.")
    return found[0].dequantize(layer)


def prepare_for_exact_weights(model: torch.nn.Module) -> int:
    """Let every backend keep `Q` exact through no-grad passes (bitsandbytes: `disable_bnb_cpu_fast_path`).

    Call it where a model is loaded, trained or evaluated; it is cheap and can be called again.

    Returns:
        `int`: the number of layers the backends prepared.

    Example:

    ```python
    prepare_for_exact_weights(model)
    ```
    """
    return sum(backend.prepare_for_exact_weights(model) for backend in BACKENDS if backend.is_available())


def why_not_quantized(layer: torch.nn.Module, parameter_name: str | None = None) -> str:
    """Why `layer` (or its parameter `parameter_name`) was left unquantized: the first backend's explanation.

    Example:

    ```python
    why_not_quantized(model.transformer.h[0].self_attention.query_key_value)  # "FalconLinear is a subclass of …"
    ```
    """
    for backend in BACKENDS:
        reason = backend.why_not_quantized(layer, parameter_name)
        if reason is not None:
            return reason
    return f"{type(layer).__name__} is not {describe_backend_layers('nor')}"


def bits_per_weight(kind: str) -> float:
    """The storage cost of one base weight quantized as `kind`, for the memory estimate.

    Raises:
        ValueError: no registered backend gives the cost of `kind`.

    Example:

    ```python
    bits_per_weight("nf4")  # 4.127 (double quantization)
    ```
    """
    for backend in BACKENDS:
        if kind in backend.bits_per_weight:
            return backend.bits_per_weight[kind]
    raise ValueError(f"No registered quantization backend gives the bits per weight of {kind!r}.")


def base_quantization(layers) -> str:
    """The kind of the first quantized base among peft LoRA `layers` (`"none"` if none is).

    Example:

    ```python
    base_quantization(find_lora_layers(model).values())  # "nf4"
    ```
    """
    for layer in layers:
        kind = quantization_kind(layer.get_base_layer())
        if kind is not None:
            return kind
    return "none"


def model_quantization(model: torch.nn.Module) -> str:
    """The kind of the first quantized layer of `model` (`"none"` if no layer is).

    Example:

    ```python
    model_quantization(model)  # "nf4"
    ```
    """
    for module in model.modules():
        kind = quantization_kind(module)
        if kind is not None:
            return kind
    return "none"


__all__ = [
    "BACKENDS",
    "BNB_QUANTIZATIONS",
    "BnbQuantization",
    "LOAD_QUANTIZATIONS",
    "LoadQuantization",
    "QUANTIZATIONS",
    "Quantization",
    "QuantizationBackend",
    "base_quantization",
    "bits_per_weight",
    "dequantize_weight",
    "describe_backend_layers",
    "describe_bnb_config",
    "disable_bnb_cpu_fast_path",
    "load_quantized_model",
    "make_bnb_config",
    "model_quantization",
    "prepare_for_exact_weights",
    "quantization_kind",
    "quiet_bnb_warnings",
    "recorded_quantizations",
    "register_backend",
    "unregister_backend",
    "why_not_quantized",
]

"""bitsandbytes: the exact dequantized weight `Q` of its layers, its configs, its CPU fast path, its warnings.

`Q` is the weight a quantized layer *actually* uses: bitsandbytes' own dequantization of its stored codes and
quant state (NF4/FP4 with any block size, double quantization included; LLM.int8's row-wise int8).

bitsandbytes' `Linear4bit` has a CPU fast path (AVX512-BF16) that repacks the weights in place the first time a
layer runs in eval mode without gradients. Afterwards gradients silently stop flowing through LoRA training,
layers whose sizes are not multiples of 32 crash, and saving can corrupt the weights (docs/methods.md §5).
`disable_bnb_cpu_fast_path` turns it off on every such layer. hf_quailora calls it, through
`hf_quailora.quantization.prepare_for_exact_weights`, where models are loaded (`load_quantized_model`), where
training starts (`DynamicRankTrainer`, `quailora_init`, which needs the exact Q), and where a model it did not load
is evaluated (`evaluate_ranks`, `compute_perplexity`).

The module ends in `BNB_BACKEND`, the first entry of `hf_quailora.quantization.BACKENDS`.

Example:

```python
from hf_quailora.quantization.bnb import dequantize_bnb_layer, make_bnb_config

config = make_bnb_config("nf4")  # for AutoModelForCausalLM.from_pretrained(..., quantization_config=config)
Q = dequantize_bnb_layer(model.model.layers[0].mlp.down_proj)  # out×in, float32
```
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch

from .._import_utils import is_bitsandbytes_available
from .base import QuantizationBackend


logger = logging.getLogger(__name__)

BnbQuantization = Literal["nf4", "fp4", "int8"]
BNB_QUANTIZATIONS: tuple[str, ...] = get_args(BnbQuantization)


class _OnceFilter(logging.Filter):
    """Let each distinct message through once (bitsandbytes repeats some warnings on every forward)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_bnb_warnings() -> None:
    """Let each distinct bitsandbytes autograd warning through once (opt-in; the recipes and the CLI call it).

    LLM.int8 layers log "inputs will be cast from … to float16" on every forward pass. This installs a filter on
    bitsandbytes' own logger, for the whole process, so call it from scripts rather than from library code.
    """
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter())


def _quant_state(layer: torch.nn.Module):
    """A 4-bit layer's quant state: on its weight, or, where sharding replaced the weight by a `DTensor` (FSDP2) or a
    flat parameter (FSDP1) that lost it, the copy bitsandbytes keeps on the module (its forward restores it there)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def _whole_codes(weight: torch.Tensor) -> torch.Tensor:
    """The layer's stored codes, gathered from every process when FSDP2 sharded them (a collective: every process
    must ask for the same layers in the same order, as `quailora_init` does)."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight.data


def disable_bnb_cpu_fast_path(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU weight repacking on every 4-bit layer of `model`.

    Layers that were already repacked are converted back (bitsandbytes' own inverse; exact for the codes, and
    the absmax statistics are requantized when double quantization is on), with a warning.

    Args:
        model (`torch.nn.Module`): any model; layers other than `bnb.nn.Linear4bit` are left alone.

    Returns:
        `int`: the number of 4-bit layers found.

    Example:

    ```python
    disable_bnb_cpu_fast_path(model)
    ```
    """
    if not is_bitsandbytes_available():
        return 0
    import bitsandbytes as bnb

    count, repacked = 0, 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
            state = _quant_state(module)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
                module.quant_state = module.weight.quant_state
                repacked += 1
    if repacked:
        logger.warning(
            "%d 4-bit layers had already been repacked by bitsandbytes' CPU fast path; converted them back. "
            "Call disable_bnb_cpu_fast_path() right after loading to avoid this.",
            repacked,
        )
    return count


def make_bnb_config(
    quantization: BnbQuantization = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
):
    """Build a `transformers.BitsAndBytesConfig` for QLoRA-style loading.

    Args:
        quantization (`str`, defaults to `"nf4"`): `"nf4"`, `"fp4"` (4-bit, block 64) or `"int8"` (LLM.int8).
        double_quant (`bool`, defaults to `True`): quantize the 4-bit block statistics too (QLoRA's default).
        compute_dtype (`torch.dtype`, *optional*): 4-bit compute dtype; bf16 on CUDA, fp32 on the CPU by default.

    Returns:
        `transformers.BitsAndBytesConfig`.

    Raises:
        ValueError: an unknown `quantization`.
        ImportError: bitsandbytes is not installed.

    Example:

    ```python
    config = make_bnb_config("nf4")
    ```
    """
    from transformers import BitsAndBytesConfig

    if quantization not in BNB_QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {BNB_QUANTIZATIONS}; got {quantization!r}.")
    if not is_bitsandbytes_available():
        raise ImportError("Quantized loading needs bitsandbytes: `pip install bitsandbytes`.")
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def describe_bnb_config(config) -> str:
    """`"nf4"`, `"fp4"` or `"int8"` for a `transformers.BitsAndBytesConfig` (`"none"` when it quantizes nothing).

    Example:

    ```python
    describe_bnb_config(make_bnb_config("fp4"))  # "fp4"
    ```
    """
    if getattr(config, "load_in_8bit", False):
        return "int8"
    if getattr(config, "load_in_4bit", False):
        return str(config.bnb_4bit_quant_type)
    return "none"


def why_not_quantized(layer: torch.nn.Module, parameter_name: str | None = None) -> str:
    """Why transformers' bitsandbytes integration left `layer` (or its parameter `parameter_name`) unquantized.

    transformers replaces only modules whose type is exactly `torch.nn.Linear` (or GPT-2's `Conv1D`) by
    bitsandbytes layers (`transformers.integrations.bitsandbytes.replace_with_bnb_linear`); subclasses such as
    Falcon's `FalconLinear`, custom modules such as a mixture-of-experts router, fused 3-D expert parameters and
    modules excluded on purpose (`lm_head`, `llm_int8_skip_modules`) stay in full precision.

    Example:

    ```python
    why_not_quantized(model.transformer.h[0].self_attention.query_key_value)  # "FalconLinear is a subclass of …"
    ```
    """
    kind = type(layer).__name__
    if parameter_name is not None:
        param = getattr(layer, parameter_name, None)
        shape = tuple(param.shape) if isinstance(param, torch.Tensor) else ()
        if len(shape) == 3:
            return (f"{kind}.{parameter_name} is a fused 3-D expert parameter {shape}, which bitsandbytes does not "
                    "quantize (it quantizes nn.Linear layers only)")
        return f"{kind}.{parameter_name} is a parameter of a {kind} module, which bitsandbytes does not quantize"
    if type(layer) is torch.nn.Linear:
        return ("an nn.Linear excluded from quantization (lm_head, llm_int8_skip_modules), or a model not loaded "
                "in 4 or 8 bit")
    if isinstance(layer, torch.nn.Linear):
        return (f"{kind} is a subclass of nn.Linear, and transformers' bitsandbytes integration only replaces modules "
                "whose type is exactly nn.Linear (or Conv1D)")
    return f"{kind} is not an nn.Linear, so bitsandbytes does not quantize it"


def bnb_quantization_kind(layer: torch.nn.Module) -> str | None:
    """`"nf4"`, `"fp4"`, `"int8"` for a bitsandbytes layer, `None` for anything else.

    Example:

    ```python
    bnb_quantization_kind(model.model.layers[0].mlp.down_proj)  # "nf4"
    ```
    """
    if not is_bitsandbytes_available():
        return None
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        state = _quant_state(layer)
        return getattr(state, "quant_type", None) or "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return None


@torch.no_grad()
def dequantize_bnb_layer(layer: torch.nn.Module) -> torch.Tensor:
    """The exact weight `Q` (out×in, float32) that a bitsandbytes layer uses in its forward pass.

    Raises `TypeError` for a layer that is not bitsandbytes', `ValueError` when its codes were repacked by the CPU fast
    path (Q is no longer exact). Called through `hf_quailora.quantization.dequantize_weight`, which has an example.
    """
    kind = bnb_quantization_kind(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt layer.")
    import bitsandbytes.functional as F

    weight = layer.weight
    if kind == "int8":
        if weight.dtype != torch.int8:  # not quantized yet (still on the meta/CPU staging path)
            raise ValueError("This 8-bit layer holds no int8 codes yet; move the model to its device first.")
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        if scb is None:
            raise ValueError("This 8-bit layer has no row scales (SCB); it cannot be dequantized.")
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)  # LLM.int8 row-wise absmax
    state = _quant_state(layer)
    if state is None:
        raise ValueError("This 4-bit layer has no quant state; it was never quantized.")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "This 4-bit layer was repacked by bitsandbytes' CPU fast path, so its exact Q is lost; reload the model "
            "and call hf_quailora.quantization.disable_bnb_cpu_fast_path(model) before any evaluation."
        )
    return F.dequantize_4bit(_whole_codes(weight), state).float()


BNB_BACKEND = QuantizationBackend(
    name="bitsandbytes",
    kinds=BNB_QUANTIZATIONS,
    layer_description="a bitsandbytes Linear4bit/Linear8bitLt layer",
    kind=bnb_quantization_kind,
    dequantize=dequantize_bnb_layer,
    is_available=is_bitsandbytes_available,
    prepare_for_exact_weights=disable_bnb_cpu_fast_path,
    why_not_quantized=why_not_quantized,
    # as `load_quantized_model` stores them: 4-bit codes plus double-quantized block statistics (8-bit absmax per
    # 64 weights, a float32 per 256 blocks: 4.127 bits); int8 codes plus a float32 per row (negligible)
    bits_per_weight={"nf4": 4.127, "fp4": 4.127, "int8": 8.0},
)


__all__ = [
    "BNB_BACKEND",
    "BNB_QUANTIZATIONS",
    "BnbQuantization",
    "bnb_quantization_kind",
    "dequantize_bnb_layer",
    "describe_bnb_config",
    "disable_bnb_cpu_fast_path",
    "make_bnb_config",
    "quiet_bnb_warnings",
    "why_not_quantized",
]

"""bitsandbytes quantization: loading quantized models safely, the exact dequantized weight `Q`, the CPU fast path.

`Q` is the weight a quantized layer *actually* uses: bitsandbytes' own dequantization of its stored codes and
quant state (NF4/FP4 with any block size, double quantization included; LLM.int8's row-wise int8).

bitsandbytes' `Linear4bit` has a CPU fast path (AVX512-BF16) that repacks the weights in place the first time a
layer runs in eval mode without gradients. Afterwards gradients silently stop flowing through LoRA training,
layers whose sizes are not multiples of 32 crash, and saving can corrupt the weights (methods.md §5).
`disable_bnb_cpu_fast_path` turns it off on every such layer. hf_quailora calls it where models are loaded
(`load_quantized_model`), where training starts (`DynamicRankTrainer`, `quailora_init`, which needs the exact Q),
and where a model it did not load is evaluated (`evaluate_ranks`, `compute_perplexity`).

Example:

```python
from hf_quailora.quantization import load_quantized_model

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
```
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, get_args

import torch

from ._import_utils import is_bitsandbytes_available, is_hub_offline
from .embedded.models import check_model_source, resolve


if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

BnbQuantization = Literal["nf4", "fp4", "int8"]
Quantization = Literal["nf4", "fp4", "int8", "none"]
BNB_QUANTIZATIONS: tuple[str, ...] = get_args(BnbQuantization)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


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
            state = module.weight.quant_state
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


def load_quantized_model(
    name_or_path: str,
    quantization: Quantization | BitsAndBytesConfig = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    **kwargs,
):
    """Load a causal LM (embedded name, folder or Hub id) quantized by bitsandbytes, with its tokenizer.

    Args:
        name_or_path (`str`): `"smollm2-135m"`, a local folder or a Hub id.
        quantization (`str` or `transformers.BitsAndBytesConfig`, defaults to `"nf4"`): `"nf4"`, `"fp4"`, `"int8"`,
            `"none"` (full precision), or a ready `BitsAndBytesConfig` (e.g. from trl's `get_quantization_config`),
            used as is (`double_quant` and `compute_dtype` then do not shape it).
        double_quant (`bool`, defaults to `True`): double quantization of 4-bit statistics.
        compute_dtype (`torch.dtype` or `"auto"`, *optional*): see `make_bnb_config`; also the dtype of unquantized
            weights (`"auto"`: the checkpoint's dtype; the 4-bit compute dtype then takes the device default).
        device_map (`str` or `dict`, *optional*): defaults to the current CUDA device, else `"cpu"`.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained`; `revision` and `trust_remote_code` also go to the
            tokenizer. While the Hub is offline (`HF_HUB_OFFLINE`), `use_kernels` defaults to `False`: transformers'
            Hub kernels cannot be fetched then, and an uncached one fails the load on a GPU.

    Returns:
        `(model, tokenizer)`; the tokenizer gets a pad token (EOS) when it has none.

    Raises:
        ValueError: an unknown `quantization`; a model folder that does not exist, or a name that is not embedded,
            not a folder and not in the Hub cache while the Hub is offline; a quantization that transformers applied
            to no layer of this model (e.g. Falcon, whose `FalconLinear` layers bitsandbytes does not replace); the
            message names the layer type.

    Example:

    ```python
    model, tokenizer = load_quantized_model("smollm2-135m", quantization="int8")
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not isinstance(quantization, BitsAndBytesConfig) and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {QUANTIZATIONS} or a BitsAndBytesConfig; got {quantization!r}."
        )
    path = resolve(name_or_path)
    check_model_source(path)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(quantization, BitsAndBytesConfig):
        kwargs["quantization_config"] = quantization
    elif quantization != "none":
        bnb_dtype = None if compute_dtype == "auto" else compute_dtype
        kwargs["quantization_config"] = make_bnb_config(quantization, double_quant, bnb_dtype)
    if "use_kernels" not in kwargs and is_hub_offline():
        # transformers 5.2x swaps layers for Hub kernels (kernels-community/…) by default when `kernels` is installed;
        # offline, a kernel that is not cached fails the whole load on a GPU ("Version 2 of
        # 'kernels-community/rotary' is not available in the local cache", seen on an H200). Keep the torch layers.
        kwargs["use_kernels"] = False
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=compute_dtype, **kwargs)
    if "quantization_config" in kwargs:
        _require_quantized_layers(model, describe_bnb_config(kwargs["quantization_config"]))
    disable_bnb_cpu_fast_path(model)
    tokenizer_kwargs = {key: kwargs[key] for key in ("revision", "trust_remote_code") if key in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def _require_quantized_layers(model: torch.nn.Module, quantization: str) -> None:
    """Raise when a model loaded with a bitsandbytes config holds no quantized layer at all (nothing was replaced)."""
    if any(quantization_kind(module) is not None for module in model.modules()):
        return
    linear = [module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]
    reason = why_not_quantized(linear[0]) if linear else "it has no linear layers"
    raise ValueError(
        f"quantization={quantization!r} was asked, but transformers quantized no layer of {type(model).__name__}: "
        f"{reason}. Load it with quantization='none' to train LoRA on the full-precision model (QuAILoRA then has no "
        "quantization error to correct), or use a model family whose linear layers are plain nn.Linear."
    )


def quantization_kind(layer: torch.nn.Module) -> str | None:
    """`"nf4"`, `"fp4"`, `"int8"` for a bitsandbytes layer, `None` for anything else."""
    if not is_bitsandbytes_available():
        return None
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        return getattr(state, "quant_type", None) or "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return None


@torch.no_grad()
def dequantize_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The exact weight `Q` (out×in, float32) that a bitsandbytes layer uses in its forward pass.

    Raises:
        TypeError: `layer` is not a bitsandbytes 4-bit or 8-bit linear layer.
        ValueError: the layer's codes were repacked by bitsandbytes' CPU fast path (Q is no longer exact).
    """
    kind = quantization_kind(layer)
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
    state = weight.quant_state
    if state is None:
        raise ValueError("This 4-bit layer has no quant state; it was never quantized.")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "This 4-bit layer was repacked by bitsandbytes' CPU fast path, so its exact Q is lost; reload the model "
            "and call hf_quailora.quantization.disable_bnb_cpu_fast_path(model) before any evaluation."
        )
    return F.dequantize_4bit(weight.data, state).float()


def base_quantization(layers) -> str:
    """The bitsandbytes quantization of the first quantized base among peft LoRA `layers` (`"none"` if none is)."""
    for layer in layers:
        kind = quantization_kind(layer.get_base_layer())
        if kind is not None:
            return kind
    return "none"


def model_quantization(model: torch.nn.Module) -> str:
    """The bitsandbytes quantization of the first quantized layer of `model` (`"none"` if no layer is)."""
    for module in model.modules():
        kind = quantization_kind(module)
        if kind is not None:
            return kind
    return "none"

"""Merged exports: rank b of an adapter folded into the weight its base computes with, as a plain transformers model.

A QuAILoRA adapter holds s·B·A ≈ W − Q on the calibrated directions (docs/methods.md §9): it corrects the quantized
weight Q towards W. Merged into the full-precision W (peft's `merge_and_unload` on the bf16 base) it applies the
correction a second time (SmolLM2-135M: 34.2 perplexity instead of 30.3). The faithful merge is

    W_merged = Q + s_b · B[:, :b] · A[:b]

with Q the exact dequantized weight (`hf_quailora.quantization.dequantize_weight`) and s_b the trained scaling at
rank b (`spec.rank_scaling_for`). `export_merged` writes it, shard by shard, as a standard model folder that
`AutoModelForCausalLM.from_pretrained` loads without hf_quailora, peft or bitsandbytes (the layout vLLM and llama.cpp's
converter read, docs/deployment.md):

| layer | written weight |
| --- | --- |
| quantized, with LoRA | `Q + s_b B_b A_b` |
| quantized, no LoRA | `Q` |
| never quantized, with LoRA | `W + s_b B_b A_b` (an ordinary merge) |
| never quantized (embeddings, norms, `lm_head`, biases) | the original weight, from the checkpoint when it is there |

Example:

```python
from hf_quailora.dynamic_rank.merge import export_merged

export_merged(trainer.model, 8, "out/merged-r8", dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained("out/merged-r8")  # no quantization, no adapter
```
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._io_utils import check_not_a_file, staged_folder
from .._peft_utils import adapter_facts
from .spec import rank_scaling_for, resolve_rank_scaling
from .truncation import checked_rank_layers


logger = logging.getLogger(__name__)

MERGED_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                         "float32": torch.float32}
DEFAULT_SHARD_SIZE = 2 * 1024**3  # bytes per safetensors shard
MODEL_CONFIG = "config.json"  # transformers' marker of a model folder: published last
SAFE_INDEX = "model.safetensors.index.json"
_MODEL_FILES = (MODEL_CONFIG, "adapter_config.json", SAFE_INDEX, "model.safetensors", "pytorch_model.bin")


class _Entry(NamedTuple):
    """One tensor of the merged state: its output name, where its value comes from, and its output shape/dtype."""

    name: str
    module: nn.Module  # the module owning the parameter (for a LoRA layer: its base layer)
    attribute: str
    source: str  # "merged" (a LoRA layer), "quantized" (Q alone), "trained" (`modules_to_save`) or "plain"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def check_merged_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`torch.bfloat16`, `torch.float16` or `torch.float32` (or their names); raise `ValueError` on anything else."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in MERGED_DTYPES:
        return MERGED_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in MERGED_DTYPES.values():
        return dtype
    raise ValueError(f"`dtype` must be one of {list(MERGED_DTYPES)}; got {dtype!r}.")


def check_merged_dir(output_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> None:
    """Raise unless `export_merged` may write into `output_dir`: a new folder, or one without model/adapter files.

    Raises:
        ValueError: `output_dir` is a file, the adapter's own folder, or holds a model or an adapter (`config.json`,
            `adapter_config.json`, safetensors or `pytorch_model.bin`).
    """
    check_not_a_file(output_dir)
    if not os.path.isdir(output_dir):
        return
    if source_dir is not None and os.path.realpath(output_dir) == os.path.realpath(source_dir):
        raise ValueError(f"`output_dir` ({output_dir}) is the folder of the adapter being merged; choose another "
                         "folder, e.g. a sibling `merged-r<rank>`.")
    held = [name for name in os.listdir(output_dir) if name in _MODEL_FILES or name.endswith(".safetensors")]
    if held:
        raise ValueError(f"`output_dir` ({output_dir}) already holds a model or an adapter ({', '.join(sorted(held))}"
                         "); a merged export is written into a new or empty folder only. Choose another folder.")


def _output_name(name: str, adapter_name: str) -> str | None:
    """The base model's own parameter name (as `from_pretrained` expects) of a name inside a peft model; `None`
    for peft's own tensors (LoRA factors, the original copy of a `modules_to_save` layer, other adapters)."""
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        at = parts.index("modules_to_save")
        if parts[at + 1 : at + 2] != [adapter_name]:
            return None
        parts = parts[:at] + parts[at + 2 :]
    return ".".join(part for part in parts if part != "base_layer")


def _tensors(base: nn.Module):
    """(name, module, attribute, tensor) of every parameter (tied ones once) and persistent buffer of `base`."""
    for name, param in base.named_parameters():
        prefix, _, attribute = name.rpartition(".")
        yield name, base.get_submodule(prefix) if prefix else base, attribute, param
    for prefix, module in base.named_modules():
        for attribute, buffer in module._buffers.items():
            if buffer is not None and attribute not in module._non_persistent_buffers_set:
                yield f"{prefix}.{attribute}" if prefix else attribute, module, attribute, buffer


def _plan(base: nn.Module, lora_bases: dict, adapter_name: str, dtype: torch.dtype) -> list[_Entry]:
    from ..quantization import quantization_kind

    entries, seen = [], set()
    for name, module, attribute, tensor in _tensors(base):
        out = _output_name(name, adapter_name)
        if out is None or out in seen:
            continue
        seen.add(out)
        quantized = attribute == "weight" and quantization_kind(module) is not None
        if attribute == "weight" and id(module) in lora_bases:
            source, layer = "merged", lora_bases[id(module)]
            shape = (layer.out_features, layer.in_features) if quantized else tuple(tensor.shape)
        elif quantized:
            source, shape = "quantized", (module.out_features, module.in_features)
        elif "modules_to_save" in name.split("."):  # trained with the adapter: the checkpoint holds the old one
            source, shape = "trained", tuple(tensor.shape)
        else:
            source, shape = "plain", tuple(tensor.shape)
        out_dtype = dtype if tensor.is_floating_point() or source in ("merged", "quantized") else tensor.dtype
        entries.append(_Entry(out, module, attribute, source, shape, out_dtype))
    merged = {id(entry.module) for entry in entries if entry.source == "merged"}
    tied = [name for name, layer in _named_lora_bases(base, lora_bases) if id(layer) not in merged]
    if tied:  # e.g. LoRA on an lm_head whose weight is the input embedding's: one tensor cannot hold both
        raise ValueError(f"LoRA layers {tied[:4]} share their weight with another layer (tied embeddings), so the "
                         "merged weight has nowhere to go. Untie them (`tie_word_embeddings=False`) before training, "
                         "or serve the 4-bit base + adapter.")
    return entries


def _named_lora_bases(base: nn.Module, lora_bases: dict):
    for name, module in base.named_modules():
        if id(module) in lora_bases:
            yield name, module


def _shards(entries: list[_Entry], max_shard_size: int) -> list[list[_Entry]]:
    shards, size = [[]], 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _original_weights(base: nn.Module, full_precision_weights):
    """Where the never-quantized tensors come from: the given source, else the checkpoint folder the model was
    loaded from (streamed one tensor at a time), else `None` (the model's own tensors)."""
    from ..quailora.weights import FullPrecisionWeights

    if full_precision_weights is False:
        return None
    if full_precision_weights is None:
        path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
        if not path or not os.path.isdir(path):
            return None
        try:
            return FullPrecisionWeights.from_folder(path).use_key_mapping(base)
        except ValueError:  # a folder without safetensors (pytorch_model.bin): use the model's tensors
            return None
    return FullPrecisionWeights.from_any(full_precision_weights).use_key_mapping(base)


def _read_original(weights, entry: _Entry, model_tensor: torch.Tensor) -> torch.Tensor:
    """The checkpoint's tensor for `entry` when the checkpoint has it with the model's shape, else the model's."""
    if weights is None:
        return model_tensor.detach()
    keys = weights._state_dict if weights._state_dict is not None else weights._files
    try:
        if entry.name in keys:
            tensor = weights._read(entry.name)
        elif entry.attribute == "weight":
            tensor = weights.get(entry.name.removesuffix(".weight"))
        else:
            return model_tensor.detach()
    except (KeyError, ValueError):
        return model_tensor.detach()
    if tuple(tensor.shape) != tuple(model_tensor.shape):
        logger.warning("%s: the checkpoint holds shape %s, the model %s; writing the model's.", entry.name,
                       tuple(tensor.shape), tuple(model_tensor.shape))
        return model_tensor.detach()
    return tensor


@torch.no_grad()
def _value(entry: _Entry, lora_bases: dict, weights, adapter_name: str, b: int, rank_scaling: str) -> torch.Tensor:
    """The output tensor of one entry, in its output dtype, on the CPU."""
    from ..quantization import dequantize_weight, quantization_kind

    tensor = getattr(entry.module, entry.attribute)
    if entry.source in ("plain", "trained"):
        value = _read_original(weights, entry, tensor) if entry.source == "plain" else tensor.detach()
        return value.to("cpu", entry.dtype).contiguous()
    if quantization_kind(entry.module) is not None:
        value = dequantize_weight(entry.module)  # Q, exactly as the forward pass uses it (float32)
    else:
        value = _read_original(weights, entry, tensor)
    value = value.to("cpu", torch.float32)
    if entry.source == "merged":
        layer = lora_bases[id(entry.module)]
        A = layer.lora_A[adapter_name].weight[:b].to("cpu", torch.float32)
        B = layer.lora_B[adapter_name].weight[:, :b].to("cpu", torch.float32)
        delta = rank_scaling_for(layer, adapter_name, b, rank_scaling) * (B @ A)  # docs/methods.md §2: s_b B_b A_b
        value += delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return value.to(entry.dtype).contiguous()


def _write_config(folder: Path, base: nn.Module, dtype: torch.dtype) -> None:
    """The base's config without its quantization, in `dtype`; `torch_dtype` is kept beside transformers 5's
    `dtype` for readers on older transformers (vLLM and llama.cpp's converter read config.json through theirs)."""
    config = copy.deepcopy(base.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(attribute, None)
    if "_is_quantized" in config.__dict__:
        config._is_quantized = False
    config.dtype = dtype
    config.save_pretrained(str(folder))
    path = folder / MODEL_CONFIG
    payload = json.loads(path.read_text())
    payload.setdefault("torch_dtype", str(dtype).removeprefix("torch."))
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _write_shards(folder: Path, entries: list[_Entry], max_shard_size: int, compute, show_progress: bool) -> None:
    """Write the state shard by shard: only the shard being written and one layer's float32 copy are alive."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shards = _shards(entries, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    progress = tqdm(total=len(entries), desc="merged export", disable=not show_progress)
    for file_name, shard in zip(names, shards):
        state = {}
        for entry in shard:
            state[entry.name] = compute(entry)
            progress.update()
        save_file(state, str(folder / file_name), metadata={"format": "pt"})
        del state
    progress.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(entry.nbytes for entry in entries)},
                 "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _merged_card(b: int, dtype: torch.dtype, quantization: str, quailora: bool, rank_scaling: str) -> str:
    what = "QuAILoRA " if quailora else ""
    return (
        "---\nlibrary_name: transformers\ntags:\n- hf_quailora\n- merged-lora\n---\n\n"
        f"# Merged {what}LoRA adapter, rank {b}\n\n"
        f"Written by `hf_quailora.dynamic_rank.merge.export_merged`: every {quantization} layer holds its exact "
        f"dequantized weight Q plus the adapter's rank-{b} update s·B·A ({rank_scaling} scaling), every other layer "
        f"its original weight, in {str(dtype).removeprefix('torch.')}. It reproduces the {quantization} base + "
        "adapter that was trained and evaluated (up to the rounding of that dtype), and loads with plain `AutoModelForCausalLM.from_pretrained` (no "
        "quantization, no adapter). Do not apply the adapter to it again.\n"
    )


def export_merged(
    model: nn.Module,
    b: int,
    output_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    rank_scaling: str | None = None,
    adapter_name: str = "default",
    *,
    tokenizer=None,
    full_precision_weights=None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    show_progress: bool = True,
) -> str:
    """Write rank `b` of a (dynamic-rank, QuAILoRA) adapter merged into its quantized base as a transformers model.

    Each quantized LoRA layer becomes `Q + s_b B[:, :b] A[:b]` (Q: the exact dequantized weight the adapter was
    trained on; s_b: the trained scaling at rank b), each quantized layer without LoRA `Q`, and every other tensor
    keeps its original value (read from the checkpoint folder the model was loaded from, one tensor at a time, else
    taken from the model). The folder holds `config.json` without `quantization_config`, the generation config, the
    tokenizer, the weights in safetensors shards (with `model.safetensors.index.json` when there are several) under
    the base model's own parameter names, and a README. Shards are written one after the other, so at most one
    layer's float32 copy is alive beyond the shard being written; the folder is staged and published in one step
    (`config.json` last): an interrupted export leaves nothing that loads.

    Args:
        model (`PeftModel`): the model holding the adapter, on the base it was trained on (e.g. NF4).
        b (`int`): the rank to merge, `1 ≤ b ≤` the trained `max_rank`.
        output_dir (`str`): a new folder, or one without model or adapter files; never the adapter's folder.
        dtype (`torch.dtype` or `str`, defaults to `torch.bfloat16`): `bfloat16`, `float16` or `float32`.
        rank_scaling (`str`, *optional*): the scaling the adapter was trained with; defaults as in `use_rank`.
        adapter_name (`str`, defaults to `"default"`).
        tokenizer (*optional*): saved into the folder; defaults to the tokenizer of the base's folder, if any.
        full_precision_weights (*optional*): where the never-quantized tensors come from (a folder, Hub id, state
            dict or `FullPrecisionWeights`); `None`: the folder the model was loaded from, if local; `False`: the
            model's own tensors.
        max_shard_size (`int`, defaults to 2 GiB): bytes per safetensors shard.
        show_progress (`bool`, defaults to `True`): a tqdm bar over tensors.

    Returns:
        `str`: `output_dir`.

    Raises:
        TypeError: `model` is not a `PeftModel`.
        ValueError: a `dtype` not in `MERGED_DTYPES`, `b` out of range (or above the trained `max_rank`), an
            unsupported LoRA layer (see `find_dynamic_rank_layers`), or a bad `output_dir` (`check_merged_dir`).

    Example:

    ```python
    model, tokenizer, *_ = load_dynamic_rank_adapter("smollm2-135m", "out/adapter")  # NF4, as trained
    export_merged(model, 8, "out/merged-r8", dtype="bfloat16", tokenizer=tokenizer)
    ```
    """
    from peft import PeftModel

    from ..quantization import base_quantization

    if not isinstance(model, PeftModel):
        raise TypeError(f"export_merged needs a peft `PeftModel`; got {type(model).__name__}.")
    dtype = check_merged_dtype(dtype)
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"`max_shard_size` must be a positive number of bytes; got {max_shard_size!r}.")
    rank_scaling = resolve_rank_scaling(model, rank_scaling, adapter_name)
    layers, _ = checked_rank_layers(model, b, adapter_name, name="merged export rank")
    facts = adapter_facts(model, adapter_name)
    check_merged_dir(output_dir, facts.get("source_dir"))

    # 1. What is written, where each tensor comes from, and in which shard: decided before anything is computed.
    base = model.get_base_model()
    lora_bases = {id(layer.get_base_layer()): layer for layer in layers.values()}
    entries = _plan(base, lora_bases, adapter_name, dtype)
    weights = _original_weights(base, full_precision_weights)
    tokenizer = tokenizer if tokenizer is not None else _base_tokenizer(base)
    card = _merged_card(b, dtype, base_quantization(layers.values()), bool(facts.get("quailora")), rank_scaling)

    # 2. Shard by shard into a staged folder, published with config.json last.
    with staged_folder(output_dir, last=MODEL_CONFIG) as tmp:
        _write_shards(tmp, entries, max_shard_size,
                      lambda entry: _value(entry, lora_bases, weights, adapter_name, b, rank_scaling), show_progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card)
        _write_config(tmp, base, dtype)
    return str(output_dir)


def _base_tokenizer(base: nn.Module):
    """The tokenizer of the folder the base was loaded from, or `None` (logged) when there is none to load."""
    path = getattr(base, "name_or_path", None)
    if not path or not os.path.isdir(path):
        logger.warning("No tokenizer given and the base was not loaded from a local folder: the merged folder has no "
                       "tokenizer; pass `tokenizer=`.")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.warning("No tokenizer in %s (%s): the merged folder has none; pass `tokenizer=`.", path, err)
        return None


__all__ = ["MERGED_DTYPES", "check_merged_dir", "check_merged_dtype", "export_merged"]

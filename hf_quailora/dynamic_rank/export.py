"""Dynamic-rank adapters on disk: export one rank as a plain peft adapter, and load a saved adapter back.

`export_rank` writes rank b as an ordinary LoRA (`r = b`, `lora_alpha` chosen so that peft's scaling equals the
trained one) that vanilla `PeftModel.from_pretrained` reproduces. `load_dynamic_rank_adapter` is the one loader
that the lm-eval model `hf-dynrank` and the `hf-quailora` command line share: it reads `dynamic_rank.json`, loads
the base the adapter was trained on, and records the adapter's scaling on the model.

Example:

```python
from hf_quailora import export_rank
from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

export_rank(trainer.model, 4, "out/rank-4", rank_scaling="constant")
loaded = load_dynamic_rank_adapter("smollm2-135m", "out/adapter")  # base in the quantization it was trained on
```

An export never replaces the adapter it comes from, nor any other adapter unless asked (`overwrite=True`); it is
written into a temporary folder and published in one step (`_io_utils.staged_folder`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from typing import NamedTuple

from torch import nn

from .._dist_utils import (
    full_tensor,
    gathered_parameters,
    has_fsdp1_modules,
    has_partitioned_parameters,
    has_sharded_parameters,
    run_on_main_process,
    unwrap_fsdp1,
    unwrapped_name,
)
from .._io_utils import staged_folder
from .._peft_utils import adapter_facts, record_adapter_facts, store_config_facts
from .exits import names_from_exit, shallow_config
from .export_dir import WEIGHTS_FILE, check_export_dir
from .fsdp1 import fsdp1_adapter_state
from .model_card import carry_card, write_adapter_card
from .saved_adapter import SavedAdapter, read_saved_adapter
from .spec import (
    DEFAULT_UPDATE_RULE,
    METADATA_FILE,
    RANK_SCALINGS,
    DynamicRankMetadata,
    RankScaling,
    check_choice,
    rank_scaling_for,
    resolve_rank_scaling,
)
from .truncation import _renamed_scaling, checked_rank_layers, lora_rank_of


logger = logging.getLogger(__name__)


def _export_alphas(layers: dict, adapter_name: str, b: int, rank_scaling: str) -> tuple[float, dict]:
    """peft's scaling at r=b is `lora_alpha / b` (or `/ √b`): the `lora_alpha` (and per-layer `alpha_pattern`)
    that reproduce the trained scaling at rank b."""
    use_rslora = rank_scaling == "rslora"
    alphas = {
        name: rank_scaling_for(layer, adapter_name, b, rank_scaling) * (math.sqrt(b) if use_rslora else b)
        for name, layer in layers.items()
    }
    values = list(alphas.values())
    default_alpha = max(set(values), key=values.count)
    if float(default_alpha).is_integer():
        default_alpha = int(default_alpha)
    prefix = "base_model.model."
    alpha_pattern = {
        re.escape(name[len(prefix) :] if name.startswith(prefix) else name): alpha
        for name, alpha in alphas.items()
        if not math.isclose(alpha, default_alpha, rel_tol=0, abs_tol=0)
    }
    return default_alpha, alpha_pattern


def _sliced_state(model, layers: dict, adapter_name: str, b: int, wrapped=None) -> dict:
    """The adapter's state dict with every LoRA factor cut to its first b components (other tensors unchanged).

    Sharded factors (FSDP2's `DTensor`s, ZeRO-3's partitioned parameters, FSDP1's flat shards: `wrapped` is the model
    as called, `model` the `PeftModel`) are gathered whole first, on every process, in the state dict's order."""
    from peft.utils import get_peft_model_state_dict

    sliced = {}
    adapter = [p for name, p in model.named_parameters() if "lora_" in name or p.requires_grad]
    if wrapped is not None and has_fsdp1_modules(wrapped):
        state = fsdp1_adapter_state(wrapped, adapter_name)
    else:
        with gathered_parameters(adapter):
            state = get_peft_model_state_dict(model, adapter_name=adapter_name)
            state = {key: full_tensor(tensor).detach().clone() for key, tensor in state.items()}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight") and key[: -len(".lora_A.weight")] in layers:
            tensor = tensor[:b]
        elif key.endswith(".lora_B.weight") and key[: -len(".lora_B.weight")] in layers:
            tensor = tensor[:, :b]
        sliced[key] = tensor.contiguous()
    return sliced


def export_rank(
    model: nn.Module,
    b: int,
    output_dir: str,
    rank_scaling: RankScaling | None = None,
    adapter_name: str = "default",
    *,
    overwrite: bool = False,
    scaling: str | None = None,
    exit: int | None = None,
) -> str:
    """Save rank `b` of a dynamic-rank adapter as an ordinary peft LoRA adapter with `r = b`.

    The factors are `A[:b]`, `B[:, :b]`; `lora_alpha` is chosen so that peft's scaling (`lora_alpha / b`, or
    `lora_alpha / √b` with rsLoRA) equals the trained scaling at b. Vanilla
    `PeftModel.from_pretrained(base, output_dir)` loads it and reproduces `use_rank(model, b, rank_scaling=...)`.
    Other trainable modules of the adapter (`modules_to_save`) are saved unchanged. Layers whose trained scaling
    differs from the most common one get an `alpha_pattern` entry (their full module name). `dynamic_rank.json` is
    written beside it (`DynamicRankMetadata`, with the base quantization and `exported_rank = b`), and a README.md
    (`model_card.write_adapter_card`: the base to load it on, and why not the full-precision one). Everything is
    checked before anything is written, and the folder is written atomically (a temporary folder, then a rename):
    an interrupted export leaves no folder that loads as an adapter. On a sharded model (FSDP2 `DTensor` factors, or
    FSDP1: pass the `FullyShardedDataParallel` root, `trainer.model`) call it on every process: the factors are
    gathered whole, process 0 writes and the others wait; a failure on process 0 raises on all of them.

    Args:
        model (`PeftModel`): the trained dynamic-rank model (or an FSDP1 `FullyShardedDataParallel` around it).
        b (`int`): the rank to export, `1 ≤ b ≤ r`, and not above the trained `max_rank`.
        output_dir (`str`): folder to write `adapter_config.json` and `adapter_model.safetensors` into; never the
            folder the adapter was loaded from.
        rank_scaling (`str`, *optional*): the `rank_scaling` the adapter was trained with; defaults as in `use_rank`.
        adapter_name (`str`, defaults to `"default"`).
        overwrite (`bool`, defaults to `False`): allow replacing another adapter in `output_dir` (an earlier export
            is replaced without it).
        scaling (`str`, *optional*): deprecated name of `rank_scaling`.
        exit (`int`, *optional*): SoFT by depth: keep only the decoder layers below `exit` (`exits.use_exit`), and
            record `exported_exit`; load it on the base with `num_hidden_layers=exit`.

    Returns:
        `str`: `output_dir`.

    Raises:
        TypeError: `model` is not a `PeftModel` (nor FSDP1 around one).
        ValueError: `b` out of range (or above the trained `max_rank`), a bad `rank_scaling`, no (supported) LoRA
            layers, or an `output_dir` that is a file, the adapter's own folder, or another adapter (see
            `check_export_dir`).

    Example:

    ```python
    export_rank(trainer.model, 4, "out/rank-4", rank_scaling=trainer.args.rank_scaling)
    model = PeftModel.from_pretrained(base_model, "out/rank-4")
    ```
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    wrapped, model = model, unwrap_fsdp1(model)  # an FSDP1 root around the PeftModel
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_rank needs a peft `PeftModel`; got {type(model).__name__}.")
    rank_scaling = resolve_rank_scaling(model, _renamed_scaling(rank_scaling, scaling), adapter_name)
    layers, _ = checked_rank_layers(model, b, adapter_name, name="export rank")
    layers = {unwrapped_name(name): layer for name, layer in layers.items()}  # the state dict's names
    dropped = tuple(f"{name}." for name in names_from_exit(model, exit)) if exit is not None else ()
    layers = {name: layer for name, layer in layers.items() if not name.startswith(dropped)}
    facts = adapter_facts(model, adapter_name)
    check_export_dir(output_dir, overwrite, facts.get("source_dir"))

    # 1. The config of a plain LoRA of rank b with the trained scaling, its factors and its metadata.
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.lora_alpha, config.alpha_pattern = _export_alphas(layers, adapter_name, b, rank_scaling)
    config.r, config.rank_pattern = b, {}
    config.use_rslora = rank_scaling == "rslora"
    config.init_lora_weights, config.inference_mode = True, True
    state = {key: value for key, value in _sliced_state(model, layers, adapter_name, b, wrapped).items()
             if not key.startswith(dropped)}
    metadata = DynamicRankMetadata.for_model(
        model, adapter_name, max_rank=b, min_rank=min(facts.get("min_rank", 1), b), rank_scaling=rank_scaling,
        update_rule=facts.get("update_rule", DEFAULT_UPDATE_RULE), exported_rank=b, exported_exit=exit,
    )
    store_config_facts(config, quailora=metadata.quailora, rank_scaling=rank_scaling, min_rank=metadata.min_rank,
                       max_rank=b, update_rule=metadata.update_rule)  # what a plain from_pretrained brings back

    # 2. Written together: a temporary folder, then published (adapter_config.json last).
    def write():
        with staged_folder(output_dir) as tmp:
            save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
            metadata.save(tmp)
            carry_card(output_dir, tmp)
            write_adapter_card(tmp, metadata)
            config.save_pretrained(str(tmp))

    if has_sharded_parameters(wrapped) or has_partitioned_parameters(model):  # called on every process (the gather
        # above): process 0 writes, all wait
        run_on_main_process(write, what="export_rank")
    else:
        write()
    return output_dir


class LoadedAdapter(NamedTuple):
    """What `load_dynamic_rank_adapter` returns."""

    model: nn.Module
    tokenizer: object
    metadata: DynamicRankMetadata | None
    rank_scaling: str
    max_rank: int  # the largest trained rank: `max_rank` of dynamic_rank.json, else the LoRA r


def _other_base(saved: SavedAdapter, recorded: str, quantization: str, allow_other_base: bool) -> None:
    """A base quantized otherwise than recorded: refused for a QuAILoRA adapter unless allowed, else logged."""
    quailora = saved.metadata is not None and saved.metadata.quailora
    if quailora and not allow_other_base:
        raise ValueError(
            f"{saved.path} is a QuAILoRA adapter trained on a {recorded!r} base: its s·B·A corrects that base's "
            f"quantization error (docs/methods.md §9), so on a {quantization!r} base it applies a correction that "
            "base does not need (SmolLM2-135M: perplexity 34.2 on the full-precision base against 30.3 on NF4). "
            f"Load it on the {recorded!r} base (drop the quantization argument), serve a merged export "
            "(`hf-quailora export --merged`), or pass allow_other_base=True (`--allow_other_base`, "
            "`allow_other_base=true` in --model_args) to do it anyway."
        )
    logger.warning("%s was trained on a %r base; loading it on a %r base as asked%s.", saved.path, recorded,
                   quantization, " (allow_other_base)" if quailora else "")


def _base_quantization(saved: SavedAdapter, quantization: str | None, allow_other_base: bool = False) -> str | None:
    """The quantization to load the base in: the explicit one, else the recorded one; `None`: not known (a plain
    adapter, or a given model that is used as it is)."""
    recorded = saved.metadata.quantization if saved.metadata is not None else None
    if quantization is not None:
        if recorded is not None and recorded != quantization:
            _other_base(saved, recorded, quantization, allow_other_base)
        return quantization
    if saved.metadata is not None and recorded is None:
        raise ValueError(
            f"{saved.path} does not record the quantization of the base the adapter was trained on (its "
            f"{METADATA_FILE} is hf_quailora 0.1's, or a launcher saved none), and the wrong base gives wrong "
            "numbers. Pass it explicitly (`quantization='nf4'`, `--quantization nf4`, `quantization=nf4` in "
            f"--model_args), or add `\"quantization\": \"nf4\"` (or none/fp4/int8) to {METADATA_FILE} (after a "
            "launcher's save: copy the start's file beside it)."
        )
    return recorded


def _check_given_base(base: nn.Module, saved: SavedAdapter, quantization: str | None,
                      allow_other_base: bool = False) -> None:
    """A model passed in (not loaded here) must be quantized as the adapter expects (any registered backend)."""
    from ..quantization import LOAD_QUANTIZATIONS, model_quantization

    actual = model_quantization(base)
    if quantization is not None and actual != quantization:
        if allow_other_base:
            logger.warning("%s needs a %r base; using the given %r model as asked (allow_other_base).", saved.path,
                           quantization, actual)
            return
        how = (f"with load_quantized_model(name, {quantization!r}), or pass the model's name instead of the model"
               if quantization in LOAD_QUANTIZATIONS else "with the library of its quantization backend")
        raise ValueError(
            f"The given base model is quantized as {actual!r}, but {saved.path} needs a {quantization!r} base (the "
            f"one it was trained on, or the `quantization` passed). Load the base {how}, or pass "
            "allow_other_base=True to use it anyway."
        )


def _check_loadable(saved: SavedAdapter, quantization: str | None) -> None:
    """`load_quantized_model` loads bitsandbytes bases; a base recorded by another backend is loaded by its library."""
    from ..quantization import LOAD_QUANTIZATIONS

    if quantization is not None and quantization not in LOAD_QUANTIZATIONS:
        raise ValueError(
            f"{saved.path} needs a {quantization!r} base, which load_quantized_model cannot load (it loads "
            f"{LOAD_QUANTIZATIONS}); load the base with the library of its quantization backend and pass the model "
            "instead of its name."
        )


def load_dynamic_rank_adapter(
    base,
    adapter_dir: str | os.PathLike | SavedAdapter,
    quantization: str | None = None,
    rank_scaling: str | None = None,
    adapter_name: str = "default",
    tokenizer=None,
    *,
    allow_other_base: bool = False,
) -> LoadedAdapter:
    """Load a base model and a saved (dynamic-rank) adapter on it, the way it was trained.

    The adapter folder is read and checked first (`read_saved_adapter`), so that a wrong folder or a broken
    `dynamic_rank.json` fails before the base model loads.

    Args:
        base (`str` or `nn.Module`): embedded name, folder or Hub id of the base; or an already loaded model, which
            must be quantized as the adapter was trained (or as `quantization` says).
        adapter_dir (`str` or `SavedAdapter`): the saved adapter (with `dynamic_rank.json` when it is
            dynamic-rank), or what `read_saved_adapter` returned for it.
        quantization (`str`, *optional*): `"none"`, `"nf4"`, `"fp4"` or `"int8"` (or another registered backend's
            kind, for a base passed as a model); defaults to the quantization recorded in `dynamic_rank.json` (the
            base the adapter was trained on), else `"none"`.
        rank_scaling (`str`, *optional*): overrides the scaling recorded in `dynamic_rank.json`.
        adapter_name (`str`, defaults to `"default"`).
        tokenizer (*optional*): used instead of the base's own tokenizer.
        allow_other_base (`bool`, defaults to `False`): load a QuAILoRA adapter on a base quantized otherwise than
            recorded (e.g. `quantization="none"`, the full-precision base, where its correction is applied twice),
            or use a given model quantized otherwise; without it both are refused.

    Returns:
        `LoadedAdapter(model, tokenizer, metadata, rank_scaling, max_rank)`; `metadata` is `None` for an ordinary
        fixed-rank adapter (logged as a warning). The model is in eval mode and remembers its `rank_scaling`, its
        trained `max_rank` and the folder it came from (which `export_rank` then refuses to write into).

    Raises:
        ValueError: see `read_saved_adapter`; a bad `quantization`/`rank_scaling`; a `dynamic_rank.json` without
            the base quantization (and none passed); a QuAILoRA adapter asked onto a base quantized otherwise than
            recorded, or a given base model quantized otherwise (unless `allow_other_base`); a base name with a
            quantization `load_quantized_model` cannot load.

    Example:

    ```python
    model, tokenizer, metadata, rank_scaling, max_rank = load_dynamic_rank_adapter("smollm2-135m", "out/adapter")
    ```
    """
    from peft import PeftModel
    from transformers import AutoConfig

    from ..embedded.models import resolve
    from ..quantization import load_quantized_model, recorded_quantizations

    if quantization is not None:
        check_choice("quantization", quantization, recorded_quantizations())
    if rank_scaling is not None:
        check_choice("rank_scaling", rank_scaling, RANK_SCALINGS)
    saved = adapter_dir if isinstance(adapter_dir, SavedAdapter) else read_saved_adapter(adapter_dir)
    metadata = saved.metadata
    if metadata is None:
        logger.warning("%s has no %s: not a dynamic-rank adapter; only its own rank is meaningful, and its base "
                       "loads in full precision unless a quantization is given.", saved.path, METADATA_FILE)
    quantization = _base_quantization(saved, quantization, allow_other_base)
    exit_k = metadata.exported_exit if metadata is not None else None  # export_rank(exit=k): a base of k layers
    if isinstance(base, (str, os.PathLike)):
        _check_loadable(saved, quantization)
        depth = {} if exit_k is None else {"config": shallow_config(AutoConfig.from_pretrained(resolve(base)),
                                                                    exit_k)}
        base, loaded_tokenizer = load_quantized_model(base, quantization or "none", **depth)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        _check_given_base(base, saved, quantization, allow_other_base)
        if exit_k not in (None, base.config.get_text_config().num_hidden_layers):
            raise ValueError(f"{saved.path} holds exit {exit_k} (the layers below it only): give a base loaded with "
                             f"num_hidden_layers={exit_k}, or the base's name.")
    model = PeftModel.from_pretrained(base, saved.path, adapter_name=adapter_name)
    model.eval()
    record_adapter_facts(model, adapter_name, source_dir=saved.path)
    if metadata is not None:
        record_adapter_facts(model, adapter_name, rank_scaling=metadata.rank_scaling, min_rank=metadata.min_rank,
                             max_rank=metadata.max_rank, update_rule=metadata.update_rule, quailora=metadata.quailora)
    rank_scaling = resolve_rank_scaling(model, rank_scaling, adapter_name)
    record_adapter_facts(model, adapter_name, rank_scaling=rank_scaling)
    max_rank = min(saved.max_rank, lora_rank_of(model, adapter_name))
    return LoadedAdapter(model, tokenizer, metadata, rank_scaling, max_rank)


__all__ = ["LoadedAdapter", "check_export_dir", "export_rank", "load_dynamic_rank_adapter"]

"""Small helpers over peft and the Trainer's model wrappers, shared by both halves of the package."""

from __future__ import annotations

import torch


def find_lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """Named peft `LoraLayer` modules of `model` that carry `adapter_name`.

    Example:

    ```python
    layers = find_lora_layers(peft_model)  # {"base_model.model.model.layers.0.self_attn.q_proj": <Linear4bit>, …}
    ```
    """
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }


def require_lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """`find_lora_layers`, raising a `ValueError` that says how to add LoRA when there is none."""
    layers = find_lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(
            f"The model has no LoRA layers with adapter {adapter_name!r}; wrap it with peft's get_peft_model "
            "(e.g. LoraConfig(target_modules='all-linear')) or pass `peft_config=` to the trainer."
        )
    return layers


def common_lora_rank(layers: dict[str, torch.nn.Module], adapter_name: str = "default") -> int:
    """The largest rank every layer supports: the smallest LoRA r over `layers` (they differ with `rank_pattern`)."""
    return min(layer.r[adapter_name] for layer in layers.values())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def active_adapter_name(model: torch.nn.Module) -> str:
    """The name of the model's active adapter (`"default"` when it has none)."""
    name = getattr(model, "active_adapter", "default")
    return name if isinstance(name, str) else name[0]


# Per-adapter facts recorded on the model object by the pieces that know them (quailora_init, the trainer, the
# adapter loader), so that later calls (use_rank, export_rank, evaluate_ranks) default to the right scaling.
_MODEL_FACTS = "_hf_quailora_adapter_facts"
# The facts that travel inside the adapter itself, so that a plain `PeftModel.from_pretrained` brings them back (peft
# keeps no trace of the folder it loaded from, and drops unknown keys of adapter_config.json). They are stored under
# this key of the LoraConfig's `auto_mapping`, the one free-form dict peft saves and reloads unchanged when the
# config has a `task_type` (without one, peft writes its own auto_mapping on save, and `dynamic_rank.json` alone
# carries them). peft's AutoPeftModel reads only `base_model_class`/`parent_library` of it, and only without a
# task_type.
CONFIG_FACTS_KEY = "hf_quailora"
CONFIG_FACTS = ("quailora", "rank_scaling", "min_rank", "max_rank", "update_rule")


def _peft_config(model, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter_name) if isinstance(configs, dict) else None


def store_config_facts(config, **facts) -> None:
    """Write facts (those of `CONFIG_FACTS`) into a peft config, where `save_pretrained` keeps them (see above).

    A config without a `task_type` is left alone: peft replaces its `auto_mapping` on save.
    """
    facts = {key: value for key, value in facts.items() if key in CONFIG_FACTS and value is not None}
    if not facts or getattr(config, "task_type", None) is None or not hasattr(config, "auto_mapping"):
        return
    mapping = dict(config.auto_mapping or {})
    mapping[CONFIG_FACTS_KEY] = {**(mapping.get(CONFIG_FACTS_KEY) or {}), **facts}
    config.auto_mapping = mapping


def config_facts(config) -> dict:
    """The facts `store_config_facts` wrote into a peft config (empty when there are none or they are malformed)."""
    stored = (getattr(config, "auto_mapping", None) or {}).get(CONFIG_FACTS_KEY) if config is not None else None
    return {key: stored[key] for key in CONFIG_FACTS if key in stored} if isinstance(stored, dict) else {}


def record_adapter_facts(model, adapter_name: str = "default", **facts) -> None:
    """Remember facts about an adapter on the model object (e.g. `quailora=True`, `rank_scaling="constant"`); those
    of `CONFIG_FACTS` also go into the adapter's peft config, so that the adapter saved by peft carries them."""
    store = model.__dict__.setdefault(_MODEL_FACTS, {})
    store.setdefault(adapter_name, {}).update(facts)
    store_config_facts(_peft_config(model, adapter_name), **facts)


def adapter_facts(model, adapter_name: str = "default") -> dict:
    """What `record_adapter_facts` remembered about an adapter, over what its peft config carries (from the folder
    it was loaded from); empty when nothing was recorded."""
    recorded = model.__dict__.get(_MODEL_FACTS, {}).get(adapter_name, {})
    return {**config_facts(_peft_config(model, adapter_name)), **recorded}

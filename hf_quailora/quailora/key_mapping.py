"""`W` of layers whose checkpoint keys transformers renames or fuses at load time, through the model's own mapping.

transformers 5 converts checkpoint keys while it loads: it renames them (EXAONE's `transformer.h.0.attn.attention.
q_proj` is the module `model.layers.0.self_attn.q_proj`; legacy multimodal checkpoints move `language_model.model`
to `model.language_model`), splits fused tensors (HRM's `gate_up_proj` becomes `gate_proj` and `up_proj`) and
stacks per-expert tensors. The rules are the model's conversion mapping (`transformers.conversion_mapping.
get_model_conversion_mapping`, `WeightRenaming` / `WeightConverter`), applied again in reverse when it saves. Suffix
matching of module names cannot see through them; this module replays the same rules on the checkpoint's keys, and
runs a converter's own operations (`Chunk`, `Concatenate`, ...) on the few tensors one layer needs.

Example:

```python
mapped = MappedCheckpointKeys(model, checkpoint_keys, read=lambda key: handle.get_tensor(key))
W = mapped.get("model.layers.0.self_attn.q_proj.weight")
```
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import torch


logger = logging.getLogger(__name__)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model (whose conversion mapping applies)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_transforms(model: torch.nn.Module) -> list:
    """The model's key transforms, as transformers' `from_pretrained` builds them (without a quantizer).

    A `_checkpoint_conversion_mapping` dict on the model (transformers 4.5x style, `regex → replacement`) is read as
    renamings applied first, as transformers does with `key_mapping=`.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    legacy = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    transforms = [WeightRenaming(source_patterns=key, target_patterns=value) for key, value in legacy.items()]
    if hasattr(model, "config"):  # a transformers PreTrainedModel
        transforms += get_model_conversion_mapping(model, None, None)
    return transforms


class MappedCheckpointKeys:
    """Checkpoint keys seen through a model's conversion mapping: parameter name → the tensors that make it.

    Args:
        model (`torch.nn.Module`): the (peft-wrapped) transformers model; its classes decide the mapping.
        keys (`Iterable[str]`): every key of the checkpoint.
        read (`Callable[[str], torch.Tensor]`): reads one checkpoint tensor.

    Plain renamings map one key to one parameter. A converter's target is produced by running a copy of that
    converter on its source tensors (e.g. the fused tensor that several layers are cut from); the last group
    converted is kept, so q, k and v cut from one fused tensor read it once.
    """

    def __init__(self, model: torch.nn.Module, keys: Iterable[str], read: Callable[[str], torch.Tensor]):
        self.model = _base_model(model)
        self._read = read
        self.renamed: dict[str, str] = {}  # parameter name → checkpoint key (renamed only)
        self._groups: dict[str, tuple] = {}  # first target → (converter, [(key, source pattern)])
        self.converted: dict[str, str] = {}  # parameter name → first target of its converter group
        self._last: tuple[str, dict] | None = None
        self._index(list(keys))

    def _index(self, keys: list[str]) -> None:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = _model_transforms(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        # Parameter names as the model had them before peft wrapped its layers (`q_proj.base_layer.weight`).
        params = {name.replace(".base_layer.", "."): param for name, param in self.model.named_parameters()}
        prefix = getattr(self.model, "base_model_prefix", None)
        for key in sorted(keys, key=dot_natural_key):  # the order transformers collects sources in
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, params)
            if pattern is None:
                if renamed != key:
                    self.renamed.setdefault(renamed, key)
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            self._groups.setdefault(renamed, (converter, []))[1].append((key, pattern))
        for first, (converter, _) in self._groups.items():
            for target in converter.target_patterns:
                self.converted.setdefault(first.replace(converter.target_patterns[0], target), first)

    def __contains__(self, param_name: str) -> bool:
        return param_name in self.renamed or param_name in self.converted

    def describe(self, param_name: str) -> str:
        """Where `param_name` comes from in the checkpoint (for messages and logs)."""
        if param_name in self.renamed:
            return f"checkpoint key {self.renamed[param_name]!r} (renamed by the model's conversion mapping)"
        converter, sources = self._groups[self.converted[param_name]]
        operations = ", ".join(type(op).__name__ for op in converter.operations)
        return f"checkpoint keys {[key for key, _ in sources][:4]} through the model's converter ({operations})"

    def key_of(self, param_name: str) -> str | None:
        """The one checkpoint key holding `param_name` as is (a renaming), else `None`."""
        return self.renamed.get(param_name)

    def get(self, param_name: str) -> torch.Tensor:
        """The full-precision tensor of `param_name`, renamed or converted as transformers does when loading.

        Raises:
            KeyError: `param_name` comes from no checkpoint key through the mapping.
            ValueError: the model's converter failed on these tensors (the message names the keys).
        """
        if param_name in self.renamed:
            return self._read(self.renamed[param_name])
        first = self.converted[param_name]
        if self._last is None or self._last[0] != first:
            self._last = None  # drop the previous group before reading the next one
            self._last = (first, self._convert(first))
        produced = self._last[1]
        if param_name not in produced:
            raise ValueError(
                f"The model's conversion mapping turns {self.describe(param_name)} into {sorted(produced)}, not "
                f"{param_name!r}; pass `full_precision_weights` as a state dict with the model's own keys."
            )
        return produced[param_name]

    def _convert(self, first: str) -> dict[str, torch.Tensor]:
        template, sources = self._groups[first]
        converter = copy.deepcopy(template)  # transformers also converts each target group with its own copy
        for key, pattern in sources:
            converter.add_tensor(first, key, pattern, self._read(key))
        try:
            produced = converter.convert(first, model=self.model, config=getattr(self.model, "config", None))
        except Exception as err:
            raise ValueError(
                f"The model's conversion mapping could not rebuild {first!r} from {self.describe(first)}: {err}. "
                "Pass `full_precision_weights` as a state dict with the model's own keys."
            ) from err
        return {name: value[0] if isinstance(value, list) else value for name, value in produced.items()}

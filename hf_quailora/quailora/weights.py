"""The full-precision weight `W` of each layer, for the quantization error `E = W − Q` (methods.md §1).

Once a model is loaded in 4 bit, W is gone from memory: it comes either from a state dict kept before
quantization or streamed tensor by tensor from the checkpoint's safetensors. A module's key is found by suffix
matching; where transformers renamed or fused the checkpoint's keys at load time, through the model's own conversion
mapping (`use_key_mapping`, `key_mapping.py`). `Q` comes from
`hf_quailora.quantization.dequantize_weight`.

Example:

```python
source = FullPrecisionWeights.from_any("path/to/checkpoint")
W = source.get("model.layers.0.self_attn.q_proj")
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .key_mapping import MappedCheckpointKeys


logger = logging.getLogger(__name__)


def _candidate_keys(module_name: str) -> list[str]:
    """Checkpoint keys that may hold `W` of a module, most specific first.

    `base_model.model.model.layers.0.q_proj` → `…` as is, `model.layers.0.q_proj.weight`, `layers.0.q_proj.weight`,
    also with `.base_layer.weight` (a state dict taken from a peft model). Suffixes never drop the last numeric
    component (the layer index): a short key like `q_proj.weight` would match every layer's module alike.
    """
    names = [module_name, module_name.replace(".base_layer", "")]
    if names[1].startswith("base_model.model."):
        names.append(names[1][len("base_model.model.") :])
    parts = names[-1].split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    last_start = digits[-1] if digits else len(parts) - 1  # keep the layer index in every suffix
    names += [".".join(parts[i:]) for i in range(1, last_start + 1)]
    keys = []
    for name in names:
        for key in (f"{name}.weight", f"{name}.base_layer.weight"):
            if key not in keys:
                keys.append(key)
    return keys


class FullPrecisionWeights:
    """Where the full-precision `W` of each layer comes from: a state dict, or a folder of safetensors.

    Tensors are read one at a time (safetensors memory-maps), so a large checkpoint is never loaded whole.

    Example:

    ```python
    weights = FullPrecisionWeights.from_any(resolve("smollm2-135m"))
    W = weights.get("base_model.model.model.layers.0.self_attn.q_proj")
    ```
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor] | None = None, files: dict[str, Path] | None = None):
        self._state_dict = dict(state_dict) if state_dict is not None else None
        self._files = files or {}
        self.description = "a state dict" if state_dict is not None else f"{len(set(self._files.values()))} files"
        self._model: torch.nn.Module | None = None
        self._mapped: MappedCheckpointKeys | None = None

    def use_key_mapping(self, model: torch.nn.Module) -> FullPrecisionWeights:
        """Resolve layers that suffix matching misses through `model`'s own checkpoint conversion mapping.

        transformers 5 renames and fuses checkpoint keys at load time (`key_mapping.MappedCheckpointKeys`); with a
        model attached, `shape` and `get` replay those rules when no key matches the module path. Returns `self`.
        """
        self._model, self._mapped = model, None
        return self

    def _mapping(self) -> MappedCheckpointKeys | None:
        if self._model is None:
            return None
        if self._mapped is None:
            keys = self._state_dict if self._state_dict is not None else self._files
            self._mapped = MappedCheckpointKeys(self._model, list(keys), self._read)
        return self._mapped

    def _read(self, key: str) -> torch.Tensor:
        if self._state_dict is not None:
            return self._state_dict[key].detach()
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def _mapped_name(self, module_name: str) -> str | None:
        """The model parameter name of `W` when only the conversion mapping knows it, else `None`."""
        mapping = self._mapping()
        if mapping is None:
            return None
        name = f"{module_name.removeprefix('base_model.model.').replace('.base_layer', '')}.weight"
        return name if name in mapping else None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> FullPrecisionWeights:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {key: folder / file for key, file in weight_map.items()}
        else:
            from safetensors import safe_open

            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    files.update({key: path for key in handle.keys()})
        if not files:
            raise ValueError(
                f"No safetensors weights in {str(folder)!r}; pass `full_precision_weights` as a state dict kept from "
                "before quantization, or a folder with *.safetensors."
            )
        weights = cls(files=files)
        weights.description = str(folder)
        return weights

    @classmethod
    def from_any(cls, source) -> FullPrecisionWeights:
        """From a `FullPrecisionWeights`, a state dict, a local folder, or a Hub id (downloads its safetensors)."""
        if isinstance(source, FullPrecisionWeights):
            return source
        if isinstance(source, Mapping):
            return cls(state_dict=source)
        if isinstance(source, (str, os.PathLike)):
            from ..embedded.models import resolve

            path = Path(resolve(source)).expanduser()
            if path.is_dir():
                return cls.from_folder(path)
            try:
                from huggingface_hub import snapshot_download

                folder = snapshot_download(str(source), allow_patterns=["*.safetensors", "*.json"])
            except Exception as err:  # offline, gated, or not a repo
                raise ValueError(
                    f"Cannot find full-precision weights at {str(source)!r}: not a local folder, and the Hub "
                    f"download failed ({err}). Pass `full_precision_weights` as a folder or a state dict."
                ) from err
            return cls.from_folder(folder)
        raise TypeError(
            "`full_precision_weights` must be a folder path, a Hub id or a state dict; "
            f"got {type(source).__name__}."
        )

    def _key(self, module_name: str) -> str | None:
        keys = self._state_dict if self._state_dict is not None else self._files
        for key in _candidate_keys(module_name):
            if key in keys:
                return key
        return None

    def shape(self, module_name: str) -> tuple[int, ...] | None:
        """The stored shape of `W` for `module_name`, or `None` when it is not there (cheap: reads metadata, unless
        the model's conversion mapping must cut it from a fused tensor)."""
        key = self._key(module_name)
        if key is None:
            mapped = self._mapped_name(module_name)
            if mapped is None:
                return None
            key = self._mapped.key_of(mapped)
            if key is None:  # produced by a converter: convert to know
                return tuple(self._mapped.get(mapped).shape)
        if self._state_dict is not None:
            return tuple(self._state_dict[key].shape)
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def get(self, module_name: str) -> torch.Tensor:
        """`W` of `module_name` as stored (call `.double()` before subtracting)."""
        key = self._key(module_name)
        if key is not None:
            return self._read(key)
        mapped = self._mapped_name(module_name)
        if mapped is None:
            raise KeyError(f"No full-precision weight for {module_name} in {self.description}.")
        logger.debug("W of %s: %s", module_name, self._mapped.describe(mapped))
        return self._mapped.get(mapped)

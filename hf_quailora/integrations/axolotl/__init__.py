"""hf_quailora inside axolotl: QuAILoRA initialisation and dynamic-rank training from an axolotl YAML.

```yaml
plugins:
  - hf_quailora.integrations.axolotl.QuAILoRAPlugin
adapter: qlora
lora_r: 16
quailora:                     # QuAILoRA start before the first step (QuAILoRAConfig's fields)
  calibration_dataset: c4     # embedded name, local file or Hub id; leave out to calibrate on the train batches
  calibration_samples: 64
dynamic_rank:                 # one LoRA rank drawn per optimizer step (DynamicRankSettings' fields)
  min_rank: 1
  eval_ranks: [1, 4, 16]
```

| module | holds | imports axolotl |
|---|---|---|
| `args` | `QuAILoRAArgs`, the blocks as a pydantic model that axolotl merges into its config validation | no |
| `plugin` | `QuAILoRAPlugin` | yes |
| `trainer` | `AxolotlDynamicRankTrainer`, `dynamic_rank_trainer_class` | yes |

This `__init__` imports nothing: each name loads its module on first use, so `import hf_quailora` and
`hf_quailora.integrations.axolotl.args` never need axolotl. See docs/launchers.md, "axolotl".
"""

import importlib


_LAZY = {
    "QuAILoRAArgs": "args",
    "QuAILoRAPlugin": "plugin",
    "AxolotlDynamicRankTrainer": "trainer",
    "dynamic_rank_trainer_class": "trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    except ModuleNotFoundError as error:
        if error.name not in ("axolotl", "pydantic"):
            raise
        raise ImportError(
            f"hf_quailora.integrations.axolotl.{name} needs axolotl (Python >= 3.12): `pip install axolotl "
            f"hf_quailora` (see docs/launchers.md, \"axolotl\")."
        ) from error
    return getattr(module, name)

"""Other launchers, each importing its framework only when used.

| module | holds |
|---|---|
| `axolotl` | `QuAILoRAPlugin` (axolotl's `BasePlugin`: the `quailora:` and `dynamic_rank:` YAML blocks) and
  `AxolotlDynamicRankTrainer` (`DynamicRankMixin` over axolotl's `AxolotlTrainer`) |

`import hf_quailora` never imports this package; `hf_quailora.integrations.axolotl` imports axolotl only when one of
its names is used (see docs/launchers.md, "axolotl").
"""

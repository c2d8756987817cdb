"""No rank search: one LoRA trained so that every rank truncation works (DyLoRA, QDyLoRA, SoFT).

| module | holds |
|---|---|
| `spec` | the vocabulary: choice lists, defaults, rank checks, scalings and their one resolver (`resolve_rank_scaling`), `DynamicRankMetadata` (`dynamic_rank.json`) |
| `sampler` | `RankSampler` (one seeded rank per optimizer step) and `step_plan`: the step's `SubModel(rank, weight)` list |
| `truncation` | `use_rank` (peft's LoRA factors at rank b) and `TrainedRanks` (the ranks an adapter may be used at) |
| `saved_adapter` | `read_saved_adapter`: an adapter folder read and checked before any model loads |
| `rank_mask` | `enable_static_rank`: truncation by a mask over a rank tensor, one graph for every rank (compile) |
| `export` | `export_rank` (a rank as a plain peft adapter), `load_dynamic_rank_adapter` |
| `merge` | `export_merged` (a rank merged into the dequantized base, as a plain transformers model) |
| `model_card` | the deployment section of every adapter folder's README.md |
| `config` | `DynamicRankConfig(SFTConfig)` |
| `mixin` | `DynamicRankMixin` (any transformers `Trainer`): one loop over the step plan, evaluation at every eval rank; `DynamicRankSettings` |
| `exits` | SoFT by depth: `use_exit` (the first k layers, then the model's own norm and head), `exit_layers`, `DepthExits` (exit losses, evaluation per exit); `exit_loss`: one exit's chunked NLL; `settings`: `DynamicRankSettings` |
| `trainer` | `DynamicRankTrainer(DynamicRankMixin, SFTTrainer)` |

This subpackage builds on `hf_quailora.quailora` (it recognises a QuAILoRA start); the start never imports it.
"""

from .config import DynamicRankConfig
from .exits import exit_layers, use_exit
from .export import export_rank, load_dynamic_rank_adapter
from .merge import export_merged
from .mixin import DynamicRankMixin, DynamicRankSettings
from .rank_mask import disable_static_rank, enable_static_rank
from .sampler import RankSampler
from .spec import DynamicRankMetadata
from .trainer import DynamicRankTrainer
from .truncation import use_rank


__all__ = [
    "DynamicRankConfig",
    "DynamicRankMetadata",
    "DynamicRankMixin",
    "DynamicRankSettings",
    "DynamicRankTrainer",
    "RankSampler",
    "disable_static_rank",
    "enable_static_rank",
    "export_merged",
    "exit_layers",
    "export_rank",
    "load_dynamic_rank_adapter",
    "use_exit",
    "use_rank",
]

"""No rank search: one LoRA trained so that every rank truncation works (DyLoRA, QDyLoRA, SoFT).

| module | holds |
|---|---|
| `spec` | choice lists, defaults, rank checks, scalings, `DynamicRankMetadata` (`dynamic_rank.json`) |
| `sampler` | `RankSampler`: one seeded rank per optimizer step |
| `truncation` | `use_rank`: peft's LoRA factors sliced to rank b |
| `export` | `export_rank` (a rank as a plain peft adapter), `load_dynamic_rank_adapter` |
| `merge` | `export_merged` (a rank merged into the dequantized base, as a plain transformers model) |
| `model_card` | the deployment section of every adapter folder's README.md |
| `config` | `DynamicRankConfig(SFTConfig)` |
| `trainer` | `DynamicRankTrainer(SFTTrainer)` |
"""

from .config import DynamicRankConfig
from .export import export_rank, load_dynamic_rank_adapter
from .merge import export_merged
from .sampler import RankSampler
from .spec import DynamicRankMetadata
from .trainer import DynamicRankTrainer
from .truncation import use_rank


__all__ = [
    "DynamicRankConfig",
    "DynamicRankMetadata",
    "DynamicRankTrainer",
    "RankSampler",
    "export_merged",
    "export_rank",
    "load_dynamic_rank_adapter",
    "use_rank",
]

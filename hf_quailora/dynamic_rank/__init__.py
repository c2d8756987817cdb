"""No rank search: one LoRA trained so that every rank truncation works (DyLoRA, QDyLoRA, SoFT).

| module | holds |
|---|---|
| `spec` | choice lists, defaults, rank checks, scalings, `DynamicRankMetadata` (`dynamic_rank.json`) |
| `sampler` | `RankSampler`: one seeded rank per optimizer step |
| `truncation` | `use_rank`: peft's LoRA factors sliced to rank b |
| `rank_mask` | `enable_static_rank`: truncation by a mask over a rank tensor, one graph for every rank (compile) |
| `export` | `export_rank` (a rank as a plain peft adapter), `load_dynamic_rank_adapter` |
| `config` | `DynamicRankConfig(SFTConfig)` |
| `trainer` | `DynamicRankTrainer(SFTTrainer)` |
"""

from .config import DynamicRankConfig
from .export import export_rank, load_dynamic_rank_adapter
from .rank_mask import disable_static_rank, enable_static_rank
from .sampler import RankSampler
from .spec import DynamicRankMetadata
from .trainer import DynamicRankTrainer
from .truncation import use_rank


__all__ = [
    "DynamicRankConfig",
    "DynamicRankMetadata",
    "DynamicRankTrainer",
    "RankSampler",
    "disable_static_rank",
    "enable_static_rank",
    "export_rank",
    "load_dynamic_rank_adapter",
    "use_rank",
]

"""hf_quailora: QuAILoRA initialisation and dynamic-rank LoRA for quantized LLMs, as Hugging Face Trainer pieces.

The subpackages are the three promises: `quailora` (a better start), `dynamic_rank` (no rank search) and
`evaluation` (proof), beside `quantization` (the backend seam: bitsandbytes and any registered backend, loading and
dequantization) and `embedded` (the model and data that ship in PyPI packages).
"""

__version__ = "0.1.0"

from . import _exit_guard
from ._peft_utils import find_lora_layers
from .dynamic_rank import (
    DynamicRankConfig,
    DynamicRankMetadata,
    DynamicRankMixin,
    DynamicRankSettings,
    DynamicRankTrainer,
    RankSampler,
    exit_layers,
    export_merged,
    export_rank,
    load_dynamic_rank_adapter,
    use_exit,
    use_rank,
)
from .embedded import ensure_embedded_data, load_alpaca_sft, load_dataset_any, resolve
from .evaluation.perplexity import compute_perplexity
from .evaluation.sweep_callback import RankSweepCallback
from .io import write_file_atomically
from .quailora import (
    QuAILoRAConfig,
    QuAILoRAInitCallback,
    QuAILoRAReport,
    quailora_first_step,
    quailora_init,
    quailora_lr_scale,
    quailora_step_ratio,
)
from .quantization import disable_bnb_cpu_fast_path, load_quantized_model, quiet_bnb_warnings
from .tokens import make_token_windows


_exit_guard.register()  # distributed runs exit cleanly (gloo worker threads vs. interpreter exit: see the module)


__all__ = [
    "DynamicRankConfig",
    "DynamicRankLM",
    "DynamicRankMetadata",
    "DynamicRankMixin",
    "DynamicRankSettings",
    "DynamicRankTrainer",
    "QuAILoRAConfig",
    "QuAILoRAInitCallback",
    "QuAILoRAReport",
    "RankSampler",
    "RankSweepCallback",
    "compute_perplexity",
    "disable_bnb_cpu_fast_path",
    "ensure_embedded_data",
    "evaluate_ranks",
    "exit_layers",
    "export_merged",
    "export_rank",
    "find_lora_layers",
    "load_alpaca_sft",
    "load_dataset_any",
    "load_dynamic_rank_adapter",
    "load_quantized_model",
    "make_token_windows",
    "quailora_first_step",
    "quailora_init",
    "quailora_lr_scale",
    "quailora_step_ratio",
    "quiet_bnb_warnings",
    "resolve",
    "use_exit",
    "use_rank",
    "write_file_atomically",
]

# lm-eval is heavy to import: its names resolve on first use (importing the bridge registers "hf-dynrank").
_LAZY = {"DynamicRankLM": "evaluation.lm_eval_bridge", "evaluate_ranks": "evaluation.lm_eval_bridge"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_quailora' has no attribute {name!r}")

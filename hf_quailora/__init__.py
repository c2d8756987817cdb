"""hf_quailora: QuAILoRA initialisation and dynamic-rank LoRA for quantized LLMs, as Hugging Face Trainer recipes."""

__version__ = "0.1.0"

from .callbacks import QuAILoRAInitCallback, RankSweepCallback
from .data import ensure_embedded_data, load_dataset_any, make_token_windows
from .dynamic_rank import RankSampler, export_rank, use_rank
from .dynamic_rank_config import DynamicRankConfig
from .dynamic_rank_trainer import DynamicRankTrainer
from .models import resolve
from .perplexity import compute_perplexity
from .quailora import QuAILoRAConfig, QuAILoRAReport, find_lora_layers, quailora_init
from .quantization import disable_bnb_cpu_fast_path, load_quantized_model


__all__ = [
    "DynamicRankConfig",
    "DynamicRankLM",
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
    "export_rank",
    "find_lora_layers",
    "load_dataset_any",
    "load_quantized_model",
    "make_token_windows",
    "quailora_init",
    "resolve",
    "use_rank",
]

# lm-eval is heavy to import: its names resolve on first use (importing the bridge registers "hf-dynrank").
_LAZY = {"DynamicRankLM": "lm_eval_bridge", "evaluate_ranks": "lm_eval_bridge"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_quailora' has no attribute {name!r}")

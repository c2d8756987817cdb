"""What the sharded scripts (dynamic_rank_fsdp1.py, dynamic_rank_fsdp2.py, dynamic_rank_zero3.py) share, for
tests/dynamic_rank/test_trainer_sharded.py: the `--from_adapter DIR` option (a QuAILoRA start written by
`hf-quailora init`, loaded with plain peft), the start's logits on the wrapped model, and the per-rank losses of a
saved adapter computed in one unwrapped process (the reference for `evaluate()`'s `eval_loss@r{b}`).
"""

import os

import torch


def pop_option(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` from `argv` and return VALUE (None when `name` is absent)."""
    if name not in argv:
        return None
    index = argv.index(name)
    value = argv[index + 1]
    del argv[index:index + 2]
    return value


def load_base(model_path: str, base: str = "fp32"):
    """The tiny base in fp32, or NF4 as `hf-quailora init` loads it (double quantization, fp32 compute on a CPU)."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if base == "nf4":
        from hf_quailora.quantization import make_bnb_config

        kwargs["quantization_config"] = make_bnb_config("nf4")
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def load_start(model_path: str, folder: str, base: str = "fp32"):
    """The adapter folder on the base, with plain `PeftModel.from_pretrained(..., is_trainable=True)`."""
    from peft import PeftModel

    from hf_quailora.quantization import prepare_for_exact_weights

    model = PeftModel.from_pretrained(load_base(model_path, base), folder, is_trainable=True)
    prepare_for_exact_weights(model)  # methods.md §5: the logits' no-grad pass must not repack the 4-bit weights
    return model


@torch.no_grad()
def start_logits(model, ids: list) -> torch.Tensor:
    """The logits of `model` (wrapped or not: every process runs this forward) in eval mode, then back to training."""
    model.eval()
    logits = model(input_ids=torch.tensor(ids)).logits.float().clone()
    model.train()
    return logits


@torch.no_grad()
def reference_losses(model_path: str, saved: str, ids: list, ranks: list[int], rank_scaling: str,
                     base: str = "fp32", factor_dtype: torch.dtype | None = None) -> dict[str, float]:
    """`eval_loss@r{b}` of the adapter saved in `saved`, unwrapped, in this process alone; the factors cast to
    `factor_dtype` (trl's bf16 on a quantized base) as in the trained model."""
    from peft import PeftModel

    from hf_quailora import use_rank
    from hf_quailora.quantization import prepare_for_exact_weights

    model = PeftModel.from_pretrained(load_base(model_path, base), saved)
    prepare_for_exact_weights(model)
    if factor_dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(factor_dtype)
    model.eval()
    batch, losses = torch.tensor(ids), {}
    for b in ranks:
        with use_rank(model, b, rank_scaling=rank_scaling):
            losses[f"eval_loss@r{b}"] = model(input_ids=batch, labels=batch).loss.item()
    return losses


def process_index() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def eval_metrics(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key.startswith("eval_loss@")}


def output_path(output_dir: str) -> str:
    return os.path.join(output_dir, f"process-{process_index()}.pt")

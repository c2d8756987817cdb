"""QuAILoRA's init on FSDP2 models (CPU, gloo), for tests/quailora/test_init_fsdp2.py.

    torchrun --nproc_per_node 2 tests/scripts/quailora_fsdp2.py MODEL_DIR ROUNDED_DIR OUT_DIR

`quailora_init` on every process, each on its share of the calibration texts, for three models:

- `load`: ROUNDED_DIR's fp32 base sharded at load by transformers (`DistributedConfig(fsdp_size=2)`), LoRA added
  afterwards (whole factors);
- `fully_shard`: the same base loaded whole, LoRA added, then each decoder block and the root `fully_shard`ed
  (`DTensor` factors);
- `nf4`: MODEL_DIR quantized to NF4, LoRA added, then `fully_shard`ed; `nf4-bf16`: the same with the factors cast
  to bf16 before `fully_shard` (as trl stores them).

ROUNDED_DIR holds MODEL_DIR with its block weights rounded to a coarse grid: `ROUNDED_BACKEND` (registered here and by
the test's one-process reference) reports those layers as quantized with `Q` their own weight, gathered whole, and
MODEL_DIR gives the full-precision `W`, so an fp32 base has a quantization error to correct.
Then `QuAILoRAInitCallback` in a `Trainer` on the `load` and `fully_shard` models (learning rate 0, one step), and
two planned failures on process 1 only (a layer missing from its full-precision weights; a non-finite W of one
layer), each of which must raise on both processes. Every process writes `process-{rank}.pt`: the factors of each case, gathered
whole, the logits of one forward after the init, and the exceptions it saw.
"""

import os
import sys
from datetime import timedelta

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from conftest import TINY_TEXTS  # noqa: E402


TEXTS = list(TINY_TEXTS[:10])
CASES = ("load", "fully_shard", "nf4", "nf4-bf16")
PROBE = torch.tensor([[5, 9, 13, 21, 30, 44, 7, 8]])
SETTINGS = {"calibration_samples": None, "calibration_length": 16, "calibration_batch_size": 2, "show_progress": False}


def _is_rounded(layer) -> bool:
    return getattr(layer, "_rounded_base", False)


def _make_backend():
    from hf_quailora._dist_utils import full_tensor
    from hf_quailora.quantization import QuantizationBackend

    return QuantizationBackend(
        name="rounded-fp32", kinds=("rounded",), layer_description="a block linear layer of the rounded test model",
        kind=lambda layer: "rounded" if _is_rounded(layer) else None,
        dequantize=lambda layer: full_tensor(layer.weight).float(),  # gathered whole from its FSDP2 shards
        bits_per_weight={"rounded": 32.0},
    )


ROUNDED_BACKEND = _make_backend()


def make_rounded_checkpoint(model_dir: str, rounded_dir: str) -> None:
    """MODEL_DIR with every block weight rounded to multiples of 1/16 (a coarse grid: a real error E = W − Q)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                param.copy_(torch.round(param * 16) / 16)
    model.save_pretrained(rounded_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(rounded_dir)


def load_lora_model(model_dir: str, rounded_dir: str, case: str, world: int = 1):
    """The case's model with LoRA (r 4, all linear layers), sharded as the case says when `world > 1`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if case.startswith("nf4"):
        from hf_quailora.quantization import make_bnb_config

        kwargs["quantization_config"] = make_bnb_config("nf4")
    if case == "load" and world > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir if case.startswith("nf4") else rounded_dir, **kwargs)
    for name, module in model.named_modules():
        if not case.startswith("nf4") and ".layers." in name and name.endswith("proj"):
            module._rounded_base = True
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    if case == "nf4-bf16":  # as trl stores a quantized model's factors (cast before fully_shard, docs/launchers.md)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    if case != "load" and world > 1:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ == "LlamaDecoderLayer":
                fully_shard(module)
        fully_shard(model)
    return model


def lora_weights(model) -> dict:
    from hf_quailora._dist_utils import full_tensor

    return {name: full_tensor(param).detach().clone() for name, param in model.named_parameters() if "lora_" in name}


def init_kwargs(model_dir: str, case: str) -> dict:
    return {} if case.startswith("nf4") else {"full_precision_weights": model_dir}


def _callback_run(model_dir: str, rounded_dir: str, out_dir: str, world: int, case: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.distributed import DistributedConfig

    from hf_quailora import QuAILoRAInitCallback

    model = load_lora_model(model_dir, rounded_dir, case, world)
    if case == "fully_shard":  # sharded by hand: marked as from_pretrained(distributed_config=...) marks it
        model.get_base_model()._is_distributed_loading_by_transformers = True
        model.get_base_model().config.distributed_config = DistributedConfig(fsdp_size=world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    callback = QuAILoRAInitCallback(calibration_dataset=TEXTS, full_precision_weights=model_dir, **SETTINGS)
    args = TrainingArguments(output_dir=out_dir, max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             report_to="none", save_strategy="no", ddp_backend="gloo",
                             learning_rate=1e-30)  # > 0, so lr_scale="auto" is considered; too small to move fp32
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(4)]
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                      processing_class=tokenizer, callbacks=[callback])
    at_init_end = callback.report is not None
    trainer.train()
    return {"weights": lora_weights(model), "at_init_end": at_init_end, "tokens": callback.report.num_tokens,
            "lr_scale": callback.lr_scale, "measured": callback.first_step is not None}


def _failures(model, model_dir: str, rank: int, tokenizer) -> list[str]:
    """Two failures planned on process 1 only; each process records `Type: message` of what it raised."""
    from safetensors.torch import load_file

    from hf_quailora import QuAILoRAConfig, quailora_init

    seen = []
    for failure in ("missing W", "non-finite W"):
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        if rank == 1 and failure == "missing W":
            del state["model.layers.1.mlp.up_proj.weight"]
        if rank == 1 and failure == "non-finite W":
            state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        try:
            quailora_init(model, TEXTS[rank::2], QuAILoRAConfig(**SETTINGS), tokenizer=tokenizer,
                          full_precision_weights=state)
            seen.append("none")
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            seen.append(f"{type(exc).__name__}: {exc}")
    return seen


def main(model_dir: str, rounded_dir: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    from hf_quailora import QuAILoRAConfig, quailora_init
    from hf_quailora.quantization import register_backend

    torch.set_num_threads(1)
    # a process left waiting would fail its collective after 60 s, not transformers' 30 minutes
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    register_backend(ROUNDED_BACKEND)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = {"weights": {}, "lora_types": {}}
    for case in CASES:
        model = load_lora_model(model_dir, rounded_dir, case, world)
        report = quailora_init(model, TEXTS[rank::world], QuAILoRAConfig(**SETTINGS), tokenizer=tokenizer,
                               **init_kwargs(model_dir, case))
        result["weights"][case] = lora_weights(model)
        result["lora_types"][case] = sorted({type(p).__name__ for n, p in model.named_parameters() if "lora_" in n})
        result[f"tokens_{case}"] = report.num_tokens
        with torch.no_grad():  # the next forward all-gathers the written shards (no stale unsharded copy)
            result[f"logits_{case}"] = model(input_ids=PROBE).logits
    result["failures"] = _failures(model, model_dir, rank, tokenizer)
    for case in ("load", "fully_shard"):
        result[f"callback_{case}"] = _callback_run(model_dir, rounded_dir, os.path.join(out_dir, case), world, case)
    torch.save(result, os.path.join(out_dir, f"process-{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

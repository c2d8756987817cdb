"""DynamicRankTrainer on FSDP2 (CPU, gloo): a few steps, `save_model` and `export_rank`, for
tests/dynamic_rank/test_trainer_sharded.py.

    torchrun --nproc_per_node 2 tests/scripts/dynamic_rank_fsdp2.py MODEL_DIR OUT_DIR [load|fully_shard] [fp32|nf4] [static]
        [--from_adapter START_DIR]

With two processes, `load`: the base is sharded at load time by transformers (`DistributedConfig(fsdp_size=2)`), so
the Trainer runs it as FSDP2 without wrapping it again; the LoRA factors, added afterwards, stay whole and
replicated (transformers keeps them in sync). `fully_shard`: the model is loaded whole, the LoRA added, and then
each decoder block and the root are sharded with `fully_shard`, so the factors are `DTensor`s outside `forward`;
the model is marked as sharded at load time so that the Trainer does not wrap it again. With one process the model
is loaded whole. With `nf4` the base is quantized and trl casts the factors to bf16; every process then
runs micro-batches of 2 (one process: 2 of them, accumulated), so that the bf16 gradients round as in the
two-process run (a single batch of 4 rounds otherwise: 1e-2 relative after 3 steps).
With `static`, truncation takes the static-shape path that `torch_compile=True` uses (`enable_static_rank`: a rank
tensor and a mask inside the factors' forward, after FSDP's all-gather), run eagerly.
After `save_model` and `export_rank`, with two processes, `evaluate()` reports `eval_loss@r2` and `eval_loss@r8`, and
each process computes the same losses on the saved adapter, unwrapped, alone (the one-process run skips both). Every process writes `process-{rank}.pt` with its
rank history, its LoRA weights gathered whole, the metrics and those losses.
With `--from_adapter START_DIR` (a folder written by `hf-quailora init`, r = 8) the same launch then trains a second
time, in OUT_DIR/adapter, from that start loaded with plain `PeftModel.from_pretrained(..., is_trainable=True)`
instead of random factors; its `process-{rank}.pt` adds the trainer's resolved `rank_scaling` and the start's logits
on the sharded model before training.
"""

import os
import sys

import torch
from sharded_start import eval_metrics, load_start, output_path, pop_option, reference_losses, start_logits


def _shard_factors(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module)
    fully_shard(model)


def main(model_path: str, output_dir: str, route: str = "load", base: str = "fp32", truncation: str = "slice",
         from_adapter: str | None = None) -> None:
    torch.set_num_threads(1)
    _train(model_path, output_dir, route, base, truncation)
    if from_adapter is not None:
        _train(model_path, os.path.join(output_dir, "adapter"), route, base, truncation, from_adapter)


def _load(model_path: str, route: str, base: str, world: int):
    """The base (sharded at load time with `load`) and LoRA r = 8 with random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if base == "nf4":
        from hf_quailora.quantization import make_bnb_config

        kwargs["quantization_config"] = make_bnb_config("nf4")
    if world > 1 and route == "load":
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def _train(model_path: str, output_dir: str, route: str, base: str, truncation: str,
           from_adapter: str | None = None) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, export_rank
    from hf_quailora._dist_utils import full_tensor

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if from_adapter is None:
        model = _load(model_path, route, base, world)
    else:  # the start loaded whole (`fully_shard` shards it below; `load` would leave the base whole)
        model = load_start(model_path, from_adapter, base)
    if world > 1 and route == "fully_shard":
        from transformers.distributed import DistributedConfig

        _shard_factors(model)
        inner = model.get_base_model()
        inner._is_distributed_loading_by_transformers = True  # as from_pretrained(distributed_config=...) marks it
        inner.config.distributed_config = DistributedConfig(fsdp_size=world)
    if truncation == "static":
        from hf_quailora.dynamic_rank import enable_static_rank

        enable_static_rank(model)
    # every sequence the same length without padding: the mean of the processes' mean losses is the one-process mean
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(8)]
    start = {} if from_adapter is None else {"start_ids": ids[:2], "start_logits": start_logits(model, ids[:2])}
    batch, accumulation = (2, 2 // world) if base == "nf4" else (4 // world, 1)
    args = DynamicRankConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", max_length=16,
        seed=0, rank_seed=7, bf16=False, per_device_eval_batch_size=batch, eval_ranks=[2, 8],
    )
    trainer = DynamicRankTrainer(model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                                 eval_dataset=Dataset.from_dict({"input_ids": ids[:4]}), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "saved"))
    export_rank(trainer.model, 4, os.path.join(output_dir, "rank-4"))
    metrics = eval_metrics(trainer.evaluate()) if world > 1 else {}
    weights = {name: full_tensor(value).detach().clone() for name, value in trainer.model.state_dict().items()
               if "lora_" in name}
    factor_dtype = next(value.dtype for value in weights.values())
    reference = reference_losses(model_path, os.path.join(output_dir, "saved"), ids[:4], trainer.args.eval_ranks,
                                 trainer.rank_scaling, base, factor_dtype) if world > 1 else {}
    torch.save({"rank_history": trainer.rank_history, "weights": weights, "world_size": world,
                "rank_scaling": trainer.rank_scaling, "metrics": metrics, "reference": reference, **start,
                "lora_types": sorted({type(p).__name__ for n, p in trainer.model.named_parameters() if "lora_" in n}),
                "factor_classes": sorted({type(m).__name__ for n, m in trainer.model.named_modules()
                                          if n.endswith((".lora_A.default", ".lora_B.default"))})},
               output_path(output_dir))


if __name__ == "__main__":
    argv = sys.argv[1:]
    adapter = pop_option(argv, "--from_adapter")
    main(*argv[:5], from_adapter=adapter)

"""DynamicRankTrainer on FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`; CPU, gloo): a few steps,
`save_model` and `export_rank`, for tests/dynamic_rank/test_trainer_sharded.py.

    torchrun --nproc_per_node 2 tests/scripts/dynamic_rank_fsdp1.py MODEL_DIR OUT_DIR [peft,layer]
        [--from_adapter START_DIR]

accelerate never selects FSDP on a CPU, so with two processes the script wraps the peft model itself, with peft's
wrap policy (`peft`: `fsdp_auto_wrap_policy`, each LoRA factor its own `FullyShardedDataParallel` module, inside
each wrapped decoder block) or one unit per decoder block (`layer`), and marks it as wrapped already so that the
Trainer does not wrap it again in DDP (transformers' flag for a model sharded at load time; the broadcast of
replicated trainable parameters that goes with that flag is for FSDP2 models and is skipped), and clips gradients
with FSDP1's `clip_grad_norm_` (the norm over every shard), as accelerate does for FSDP1 on a GPU. With one process
the model is not wrapped. The policies named (comma-separated) run one after the other, in OUT_DIR/POLICY; the
settings are those of tests/scripts/dynamic_rank_fsdp2.py with an fp32 base. After `save_model` and `export_rank`,
`evaluate()` reports `eval_loss@r2` and `eval_loss@r8`, and each process computes the same losses on the saved
adapter, unwrapped, alone. Every process writes `process-{rank}.pt` with its rank history, its LoRA weights
gathered whole (FSDP1's default full state dict), the metrics and those losses.
With `--from_adapter START_DIR` (a folder written by `hf-quailora init`, r = 8) the same launch then trains once more,
with peft's wrap policy, in OUT_DIR/adapter, from that start loaded on the fp32 base with plain
`PeftModel.from_pretrained(..., is_trainable=True)` instead of random factors; its `process-{rank}.pt` adds the
trainer's resolved `rank_scaling` and the start's logits on the wrapped model before training.
"""

import os
import sys

import torch
from sharded_start import eval_metrics, load_start, output_path, pop_option, reference_losses, start_logits


def _wrap(model, policy: str):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    wrap_policy = fsdp_auto_wrap_policy(model) if policy == "peft" else ModuleWrapPolicy({LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=wrap_policy, use_orig_params=True,
                                       device_id=torch.device("cpu"))
    wrapped.is_distributed_loading_by_transformers = True
    return wrapped


def main(model_path: str, output_dir: str, policies: str = "peft,layer", from_adapter: str | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    for policy in policies.split(","):
        _train(model_path, os.path.join(output_dir, policy), policy, world)
    if from_adapter is not None:
        _train(model_path, os.path.join(output_dir, "adapter"), "peft", world, from_adapter)


def _train(model_path: str, output_dir: str, policy: str, world: int, from_adapter: str | None = None) -> None:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, export_rank

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if from_adapter is None:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))
    else:
        model = load_start(model_path, from_adapter)
    if world > 1:
        model = _wrap(model, policy)
    # every sequence the same length without padding: the mean of the processes' mean losses is the one-process mean
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(8)]
    start = {} if from_adapter is None else {"start_ids": ids[:2], "start_logits": start_logits(model, ids[:2])}
    args = DynamicRankConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=4 // world, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", max_length=16,
        seed=0, rank_seed=7, bf16=False, per_device_eval_batch_size=4 // world, eval_ranks=[2, 8],
    )
    trainer = DynamicRankTrainer(model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                                 eval_dataset=Dataset.from_dict({"input_ids": ids[:4]}), processing_class=tokenizer)
    if world > 1:
        trainer._sync_replicated_trainable_parameters = lambda model: None
        # the gradient norm over every shard (the Trainer's default would clip each process's shard by its own norm)
        trainer._clip_grad_norm = lambda model: model.clip_grad_norm_(args.max_grad_norm)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "saved"))
    export_rank(trainer.model, 4, os.path.join(output_dir, "rank-4"))
    metrics = eval_metrics(trainer.evaluate())
    weights = {name: value.detach().clone() for name, value in trainer.model.state_dict().items() if "lora_" in name}
    reference = reference_losses(model_path, os.path.join(output_dir, "saved"), ids[:4], trainer.args.eval_ranks,
                                 trainer.rank_scaling)
    torch.save({"rank_history": trainer.rank_history, "reference": reference, "weights": weights, "world_size": world,
                "metrics": metrics, "rank_scaling": trainer.rank_scaling, **start,
                "model_class": type(trainer.model).__name__,
                "wrapped_factors": sum(type(m).__name__ == "FullyShardedDataParallel" and n.endswith(".default")
                                       for n, m in trainer.model.named_modules())},
               output_path(output_dir))


if __name__ == "__main__":
    argv = sys.argv[1:]
    adapter = pop_option(argv, "--from_adapter")
    main(*argv[:3], from_adapter=adapter)

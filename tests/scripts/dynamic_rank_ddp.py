"""Two-process DynamicRankTrainer run for tests/dynamic_rank/test_trainer.py.

Launch: `torchrun --nproc_per_node 2 tests/scripts/dynamic_rank_ddp.py MODEL_DIR OUTPUT_DIR [exits]` (CPU, gloo).
Each process writes `process-{rank}.pt` with its rank history and final LoRA weights.
With `exits`: SoFT by depth (`soft_exits=[1, 2]`, weights 0.5 and 1), 3 steps of 2 sequences per process, the
micro-batches accumulated so that one process (`main(..., "exits")` without torchrun: 2 accumulated micro-batches
of 2) sees the same ones; no gradient checkpointing.
"""

import os
import sys

import torch


def main(model_path: str, output_dir: str, mode: str = "") -> None:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    texts = [f"Sentence number {i} about low rank adapters and ranks." for i in range(32)]
    settings = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo",
                    max_length=32, seed=0, rank_seed=7, gradient_checkpointing=True)
    if mode == "exits":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        settings.update(soft_exits=[1, 2], soft_exit_weights=[0.5, 1.0], max_steps=3,
                        gradient_accumulation_steps=2 // world, gradient_checkpointing=False,
                        ddp_backend="gloo" if world > 1 else None)  # one process: no process group
    args = DynamicRankConfig(output_dir=output_dir, **settings)
    trainer = DynamicRankTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    process = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters() if "lora_" in name}
    torch.save(
        {"rank_history": trainer.rank_history, "weights": weights, "world_size": world},
        os.path.join(output_dir, f"process-{process}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])

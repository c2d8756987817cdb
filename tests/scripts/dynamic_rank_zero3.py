"""DynamicRankTrainer under DeepSpeed ZeRO-3 on the CPU (DeepSpeed's CPU accelerator, gloo), for
tests/dynamic_rank/test_trainer_sharded.py (its settings are those of dynamic_rank_fsdp2.py with an fp32 base).

    torchrun --nproc_per_node 2 tests/scripts/dynamic_rank_zero3.py MODEL_DIR OUT_DIR [zero3|plain]

The training arguments ask for ZeRO-3 before the model loads, so transformers partitions the base at load time
(`deepspeed.zero.Init`). `QuAILoRAInitCallback` must refuse it by name; `DynamicRankTrainer` then takes 3 steps on
LoRA r = 8, and `save_model` and `export_rank` write adapters gathered whole. Every process writes
`process-{rank}.pt` with the refusal, its rank history and the LoRA weights, gathered whole. `plain`: the same
run without DeepSpeed (the one-process reference).
"""

import os
import sys

import torch


def _without_shm_collectives() -> None:
    """Leave DeepSpeed's CPU collectives to gloo: its shared-memory ones are a C++ op that it compiles at the first
    run (minutes on a loaded 2-core machine), and the tests do not need their speed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}


def main(model_path: str, output_dir: str, setup: str = "zero3") -> None:
    import deepspeed
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, QuAILoRAInitCallback, export_rank

    torch.set_num_threads(1)
    _without_shm_collectives()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                   "stage3_param_persistence_threshold": 0},  # tiny factors partitioned too,
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "bf16": {"enabled": False}}
    args = DynamicRankConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2 // world,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        ddp_backend="gloo", max_length=16, seed=0, rank_seed=7, bf16=False, deepspeed=zero3 if setup == "zero3" else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)  # partitioned: the ZeRO-3 arguments exist already
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(8)]
    data = Dataset.from_dict({"input_ids": ids})
    try:  # what the Trainer's constructor calls at its end (a second Trainer cannot join DeepSpeed's state)
        QuAILoRAInitCallback(calibration_dataset=["some text"] * 4).on_init_end(
            args, TrainerState(), TrainerControl(), model=model, processing_class=tokenizer)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    trainer = DynamicRankTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "saved"))
    export_rank(trainer.model, 4, os.path.join(output_dir, "rank-4"))
    lora = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters([p for _, p in lora]):
        weights = {name: p.detach().clone() for name, p in lora}
    process = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"refusal": refusal, "rank_history": trainer.rank_history, "weights": weights, "world_size": world,
                "partitioned": sorted({type(p).__name__ + str(tuple(p.data.shape)) for _, p in lora})[:3],
                "engine": type(trainer.model_wrapped).__name__},
               os.path.join(output_dir, f"process-{process}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""DynamicRankTrainer under DeepSpeed ZeRO-3 on the CPU (DeepSpeed's CPU accelerator, gloo), for
tests/dynamic_rank/test_trainer_sharded.py (its settings are those of dynamic_rank_fsdp2.py with an fp32 base).

    torchrun --nproc_per_node 2 tests/scripts/dynamic_rank_zero3.py MODEL_DIR OUT_DIR [zero3|plain]
        [--from_adapter START_DIR]

The training arguments ask for ZeRO-3 before the model loads, so transformers partitions the base at load time
(`deepspeed.zero.Init`). `QuAILoRAInitCallback` must refuse it by name; `DynamicRankTrainer` then takes 3 steps on
LoRA r = 8, and `save_model` and `export_rank` write adapters gathered whole; `evaluate()` reports `eval_loss@r2` and
`eval_loss@r8`, and each process computes the same losses on the saved adapter, unwrapped, alone. Every process
writes `process-{rank}.pt` with the refusal, its rank history, the LoRA weights gathered whole, the metrics and those
losses. `plain`: the same run without DeepSpeed (the one-process reference).
With `--from_adapter START_DIR` (a folder written by `hf-quailora init`, r = 8) the same launch then trains a second
time, in OUT_DIR/adapter, from that start loaded on the partitioned fp32 base with plain
`PeftModel.from_pretrained(..., is_trainable=True)` instead of random factors; its `process-{rank}.pt` adds the
trainer's resolved `rank_scaling` and the start's logits before training (parameters gathered for that forward).
"""

import os
import sys

import torch
from sharded_start import eval_metrics, load_start, output_path, pop_option, reference_losses, start_logits


def _without_shm_collectives() -> None:
    """Leave DeepSpeed's CPU collectives to gloo: its shared-memory ones are a C++ op that it compiles at the first
    run (minutes on a loaded 2-core machine), and the tests do not need their speed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}


def main(model_path: str, output_dir: str, setup: str = "zero3", from_adapter: str | None = None) -> None:
    torch.set_num_threads(1)
    _without_shm_collectives()
    _train(model_path, output_dir, setup)
    if from_adapter is not None:
        _train(model_path, os.path.join(output_dir, "adapter"), setup, from_adapter)


def _load(model_path: str, from_adapter: str | None, tokenizer, args):
    """LoRA r = 8 with random factors (and the init's refusal), or the start; the base partitioned as it loads."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if from_adapter is not None:
        return load_start(model_path, from_adapter), None
    model = AutoModelForCausalLM.from_pretrained(model_path)  # partitioned: the ZeRO-3 arguments exist already
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model, _refusal(model, tokenizer, args)


def _train(model_path: str, output_dir: str, setup: str, from_adapter: str | None = None) -> None:
    import deepspeed
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, export_rank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                   "stage3_param_persistence_threshold": 0},  # tiny factors partitioned too,
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "bf16": {"enabled": False}}
    args = DynamicRankConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2 // world,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        ddp_backend="gloo", max_length=16, seed=0, rank_seed=7, bf16=False, deepspeed=zero3 if setup == "zero3" else None,
        per_device_eval_batch_size=2, eval_ranks=[2, 8],
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, refusal = _load(model_path, from_adapter, tokenizer, args)
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(8)]
    start = {}
    if from_adapter is not None:  # a forward outside the engine: every parameter gathered whole for it
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            start = {"start_ids": ids[:2], "start_logits": start_logits(model, ids[:2])}
    trainer = DynamicRankTrainer(model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                                 eval_dataset=Dataset.from_dict({"input_ids": ids[:4]}), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "saved"))
    export_rank(trainer.model, 4, os.path.join(output_dir, "rank-4"))
    metrics = eval_metrics(trainer.evaluate())
    lora = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters([p for _, p in lora]):
        weights = {name: p.detach().clone() for name, p in lora}
    unset_hf_deepspeed_config()  # else the reference's base would be partitioned as it loads
    reference = reference_losses(model_path, os.path.join(output_dir, "saved"), ids[:4], trainer.args.eval_ranks,
                                 trainer.rank_scaling)
    torch.save({"refusal": refusal, "rank_history": trainer.rank_history, "weights": weights, "world_size": world,
                "partitioned": sorted({type(p).__name__ + str(tuple(p.data.shape)) for _, p in lora})[:3],
                "engine": type(trainer.model_wrapped).__name__, "rank_scaling": trainer.rank_scaling,
                "metrics": metrics, "reference": reference, **start},
               output_path(output_dir))


def _refusal(model, tokenizer, args) -> str | None:
    """What `QuAILoRAInitCallback` says at `on_init_end` (what the Trainer's constructor calls at its end; a second
    Trainer cannot join DeepSpeed's state) on the partitioned model."""
    from transformers import TrainerControl, TrainerState

    from hf_quailora import QuAILoRAInitCallback

    try:
        QuAILoRAInitCallback(calibration_dataset=["some text"] * 4).on_init_end(
            args, TrainerState(), TrainerControl(), model=model, processing_class=tokenizer)
    except ValueError as error:
        return str(error)
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    adapter = pop_option(argv, "--from_adapter")
    main(*argv[:3], from_adapter=adapter)

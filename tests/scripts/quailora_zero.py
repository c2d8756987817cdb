"""QuAILoRA init and DynamicRankTrainer under DeepSpeed ZeRO on the CPU (DeepSpeed's CPU accelerator, gloo), for
tests/test_deepspeed_zero.py.

    torchrun --nproc_per_node 2 tests/scripts/quailora_zero.py MODEL_DIR OUT_DIR STAGE

STAGE 1 or 2: DeepSpeed ZeRO at that stage (`deepspeed` in the training arguments); 0: no DeepSpeed (a comparison
by hand: DeepSpeed steps an fp32 master copy of trl's bf16 factors, this run does not). Micro-batches of 2 on every
process (one process accumulates 2 of them), as in the two-process run. The NF4 model gets LoRA r = 4; `QuAILoRAInitCallback` initialises at `on_init_end`, before
DeepSpeed wraps the model; `DynamicRankTrainer` then takes 3 steps, `save_model` and `export_rank` write adapters.
Every process writes `process-{rank}.pt` with the LoRA weights after the init and after training.
"""

import os
import sys

import torch
from transformers import TrainerCallback


def _deepspeed_config(stage: int) -> dict | None:
    if stage == 0:
        return None
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}


def _lora_weights(model) -> dict:
    return {name: param.detach().float().clone() for name, param in model.named_parameters() if "lora_" in name}


def _without_shm_collectives() -> None:
    """Leave DeepSpeed's CPU collectives to gloo: its shared-memory ones are a C++ op that it compiles at the first
    run (minutes on a loaded 2-core machine), and the tests do not need their speed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}


class _Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = _lora_weights(model)


def main(model_dir: str, out_dir: str, stage: str = "0") -> None:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, QuAILoRAInitCallback, export_rank
    from hf_quailora.quantization import load_quantized_model

    torch.set_num_threads(1)
    _without_shm_collectives()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from sharded_start import eval_metrics, reference_losses

    from conftest import TINY_TEXTS

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DynamicRankConfig(
        output_dir=out_dir, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2 // world, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", max_length=16,
        seed=0, rank_seed=7, bf16=False, deepspeed=_deepspeed_config(int(stage)),
        per_device_eval_batch_size=2, eval_ranks=[2, 4],
    )
    model, tokenizer = load_quantized_model(model_dir, "nf4")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    callback = QuAILoRAInitCallback(calibration_dataset=list(TINY_TEXTS[:8]), calibration_samples=8,
                                    calibration_length=32)
    snapshot = _Snapshot()  # after the init: at on_init_end (DeepSpeed) or on_train_begin (one process)
    ids = [[(7 * i + j) % (len(tokenizer) - 3) + 3 for j in range(16)] for i in range(8)]
    trainer = DynamicRankTrainer(model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                                 eval_dataset=Dataset.from_dict({"input_ids": ids[:4]}), processing_class=tokenizer,
                                 callbacks=[callback, snapshot])
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "saved"))
    export_rank(trainer.model, 2, os.path.join(out_dir, "rank-2"))
    evaluation = {}
    if world > 1:  # per-rank eval under ZeRO: against the saved adapter at each rank, unwrapped, in this process
        factor_dtype = next(p.dtype for name, p in model.named_parameters() if "lora_" in name)
        evaluation = {"metrics": eval_metrics(trainer.evaluate()),
                      "reference": reference_losses(model_dir, os.path.join(out_dir, "saved"), ids[:4],
                                                    trainer.args.eval_ranks, trainer.rank_scaling, "nf4", factor_dtype)}
    process = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"initialised": snapshot.weights, "trained": _lora_weights(model), "rank_history": trainer.rank_history,
                "world_size": world, "engine": type(trainer.model_wrapped).__name__, **evaluation},
               os.path.join(out_dir, f"process-{process}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:4])

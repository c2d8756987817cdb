"""Run QuAILoRAInitCallback inside SFTTrainer under torchrun (gloo, CPU); each process saves its LoRA weights.

    torchrun --nproc_per_node 2 tests/scripts/quailora_ddp.py MODEL_DIR OUT_DIR [SAMPLES:BATCH_SIZE ...]

Per case (default `8:8`), one fresh model and trainer in the same launch, writing `OUT_DIR/SAMPLES-BATCH_SIZE/`:
SAMPLES calibration texts at BATCH_SIZE per forward; the script also records how many forwards each process ran
(embedding calls), so a test can check that uneven shares were evened out. A case `SAMPLES:BATCH_SIZE:LR` trains at
learning rate LR (default 0, which leaves the start as written) and writes `OUT_DIR/SAMPLES-BATCH_SIZE-LR/`; the
callback's `lr_scale="auto"` then measures the first step on every process (quailora/first_step.py).
"""

import os
import sys

import datasets
import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from hf_quailora import QuAILoRAInitCallback
from hf_quailora.quantization import load_quantized_model


def main(model_dir: str, out_dir: str, samples: int = 8, batch_size: int = 8, learning_rate: float = 0.0) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from conftest import TINY_TEXTS

    model, tokenizer = load_quantized_model(model_dir, "nf4")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    texts = list(TINY_TEXTS)
    data = datasets.Dataset.from_dict({"prompt": [t[:20] for t in texts], "completion": [t[20:] for t in texts]})
    args = SFTConfig(output_dir=out_dir, max_steps=1, per_device_train_batch_size=2, max_length=64, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", learning_rate=learning_rate, ddp_backend="gloo", lr_scheduler_type="constant")
    callback = QuAILoRAInitCallback(calibration_dataset=texts[:samples], calibration_samples=samples,
                                    calibration_length=32, calibration_batch_size=batch_size)
    forwards = []
    model.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    os.makedirs(out_dir, exist_ok=True)
    step = callback.first_step
    torch.save({"weights": weights, "world": world, "tokens": callback.report.num_tokens, "forwards": len(forwards),
                "lr_scale": callback.lr_scale, "lr": trainer.optimizer.param_groups[0]["lr"],
                "first_step": None if step is None else (step.correction_kl, step.step_kl, step.tokens)},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in sys.argv[3:] or ["8:8"]:  # one launch for every case: the imports dominate a tiny run
        samples, batch_size, *rate = case.split(":")
        main(sys.argv[1], os.path.join(sys.argv[2], case.replace(":", "-")), int(samples), int(batch_size),
             float(rate[0]) if rate else 0.0)

"""A fresh process loads a saved QuAILoRA start with plain peft and trains it 2 steps with DynamicRankTrainer.

Launch: `python tests/scripts/train_quailora_start.py MODEL_DIR ADAPTER_DIR INPUT_IDS.pt OUTPUT_DIR` (CPU), for
tests/scripts/test_init_adapter.py. Writes `OUTPUT_DIR/result.pt`: the reloaded start's logits on the given input
ids, the trainer's resolved `rank_scaling`, the warnings raised and the hf_quailora log records at WARNING or above.
"""

import logging
import os
import sys
import warnings

import torch


def main(model_path: str, adapter_dir: str, inputs_path: str, output_dir: str) -> None:
    from datasets import Dataset
    from peft import PeftModel

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, load_quantized_model
    from hf_quailora.quantization import prepare_for_exact_weights
    from hf_quailora.scripts import RecipeModelConfig, build_quantization_config

    torch.set_num_threads(1)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("hf_quailora").addHandler(handler)
    # The base exactly as `hf-quailora init` loaded it (the recipes' NF4 settings), then the adapter, plain peft.
    quantization = build_quantization_config(RecipeModelConfig(model_name_or_path=model_path))
    base, tokenizer = load_quantized_model(model_path, quantization, compute_dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        prepare_for_exact_weights(model)  # methods.md §5: an eval pass must not repack the 4-bit weights
        model.eval()
        with torch.no_grad():
            logits = model(torch.load(inputs_path, weights_only=True)).logits
        model.train()
        args = DynamicRankConfig(output_dir=output_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                                 logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=32,
                                 bf16=False, rank_seed=3)
        texts = [f"Sentence number {i} about low rank adapters." for i in range(8)]
        trainer = DynamicRankTrainer(model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                     processing_class=tokenizer)
        trainer.train()
        trainer.save_model(os.path.join(output_dir, "trained"))
    torch.save({"logits": logits, "rank_scaling": trainer.rank_scaling, "rank_history": trainer.rank_history,
                "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                "log_records": [record.getMessage() for record in records]},
               os.path.join(output_dir, "result.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:5])

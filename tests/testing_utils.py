"""Skip markers and small helpers shared by the tests."""

import gc
import importlib.util
import os

import pytest
import torch


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
SCRIPTS_DIR = os.path.join(TESTS_DIR, "scripts")

R = 8  # the LoRA r of the tiny test adapters
TINY_NUM_BLOCKS = 2  # the tiny Llama of conftest.tiny_model_path
TINY_LINEAR_LAYERS = TINY_NUM_BLOCKS * 7  # q, k, v, o, gate, up, down per block: every LoRA layer of "all-linear"
TINY_DISTINCT_INPUTS = TINY_NUM_BLOCKS * 4  # attention in (q/k/v), o_proj in, MLP in (gate/up), down_proj in

require_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"
)
# DeepSpeed is the `deepspeed` extra (`pip install -e ".[deepspeed]"`); on a CPU it runs on its CPU accelerator
require_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
require_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def snapshot(model: torch.nn.Module, only_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Copies of the (trainable) parameters, for before/after comparisons."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad or not only_trainable
    }


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other work: one torch thread is much faster than two (methods.md §5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(path, quantization="none", r=R, seed=0):
    """A peft model (LoRA r on all linear layers, random A and B) on the tiny model, with its tokenizer."""
    from peft import LoraConfig, get_peft_model

    from hf_quailora import load_quantized_model

    model, tokenizer = load_quantized_model(path, quantization=quantization)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora), tokenizer


def save_adapter(path, folder, r=R, seed=0, **metadata):
    """Save a LoRA of rank r (random A and B) on the tiny model into `folder`, with a `dynamic_rank.json` of
    `metadata` (max_rank defaults to r, quantization to "none"; `max_rank=None`: none, a plain adapter)."""
    from hf_quailora import DynamicRankMetadata

    model, _ = make_model(path, r=r, seed=seed)
    model.save_pretrained(folder)
    metadata = {"max_rank": r, "quantization": "none", **metadata}
    if metadata["max_rank"] is not None:
        DynamicRankMetadata(**metadata).save(folder)
    return str(folder)


def make_trainer(path, texts, output_dir, quantization="none", model=None, callbacks=None, **overrides):
    """A DynamicRankTrainer on the tiny model: 4 steps of batch 4, no checkpoints, CPU."""
    from datasets import Dataset

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer

    if model is None:
        model, tokenizer = make_model(path, quantization)
    else:
        model, tokenizer = model
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=32,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        max_length=32,
        seed=0,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    data = Dataset.from_dict({"text": texts})
    return DynamicRankTrainer(
        model,
        args=DynamicRankConfig(**settings),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def tensor_bytes() -> int:
    """Bytes of every tensor storage alive anywhere in the process (after a garbage collection), each counted once.

    The model's parameters are written in place, so any difference across a QuAILoRA initialisation is what it
    left behind: Gram matrices (float32 or float64), W, Q, E, pending factors, cached hidden states.
    """
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a FakeTensor left in dynamo's caches by an earlier compiled test: no real storage
                continue
    return sum(storages.values())


def save_random_dynamic_rank_adapter(model_path, folder):
    """A rank-8 LoRA with random A and B on `model_path`, saved in `folder` as a dynamic-rank adapter (so every
    rank differs); returns the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_quailora.dynamic_rank.spec import DynamicRankMetadata

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(folder)
    DynamicRankMetadata(min_rank=1, max_rank=8, rank_scaling="per_rank", quantization="none").save(folder)
    return model

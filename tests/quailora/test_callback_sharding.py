"""QuAILoRAInitCallback refuses runs whose parameters are sharded (FSDP, tensor parallelism) before any calibration.

The callback writes whole factors into every process's parameters, which is right only when each process holds the
whole, only copy of each trainable parameter: one process, DDP, and FSDP/DeepSpeed runs before the Trainer wraps the
model (`on_init_end`). Checked here with a real SFTTrainer asked for FSDP (as `accelerate launch --use_fsdp` asks),
with meta weights, and with a model really sharded by torch's FSDP2 and tensor parallelism in a one-process gloo
group on the CPU. DeepSpeed is not installed here: its branch (any ZeRO stage: ZeRO-3 partitions the
parameters, ZeRO-1/2 keep an fp32 master copy made before the callback runs) is untested.
"""

import datasets
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState
from trl import SFTConfig, SFTTrainer

from hf_quailora import QuAILoRAInitCallback, quailora_init
from hf_quailora.quantization import load_quantized_model

from testing_utils import snapshot


REFUSAL = (r"QuAILoRAInitCallback cannot initialise under {}.*Supported in process: one process, DDP.*a model "
           r"sharded by FSDP2.*hf-quailora init")


def lora_model(path):
    model, tokenizer = load_quantized_model(path, "none")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), tokenizer


def sft_args(tmp_path, **kwargs):
    return SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=32, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", **kwargs)


def test_a_trainer_launched_for_fsdp_initialises_before_wrapping(tiny_model_path, tiny_texts, tmp_path, monkeypatch):
    # `accelerate launch --use_fsdp` sets this. The Trainer would wrap the model inside train(), so the callback
    # initialises at on_init_end, while the weights are whole, and on_train_begin leaves them alone. (On a CPU
    # accelerate falls back to one process: the wrapping itself is not exercised here.)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = snapshot(model)
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=4, calibration_length=16)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), processing_class=tokenizer, callbacks=[callback],
                         train_dataset=datasets.Dataset.from_dict({"text": tiny_texts}))
    report, after = callback.report, snapshot(model)
    assert report is not None  # ran at on_init_end, inside the Trainer's constructor
    assert any(not torch.equal(value, before[name]) for name, value in after.items() if "lora_B" in name)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model,
                            processing_class=tokenizer)
    assert callback.report is report
    for name, value in snapshot(model).items():
        assert torch.equal(value, after[name]), name


def test_a_wrapped_run_with_meta_weights_is_refused_naming_hf_quailora_init(tiny_model_path, tiny_texts, tmp_path,
                                                                            monkeypatch):
    # rank-0-only loading (FSDP's cpu_ram_efficient_loading) leaves the other processes meta weights
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model, tokenizer = lora_model(tiny_model_path)
    head = model.base_model.model.lm_head
    head.weight = torch.nn.Parameter(torch.empty_like(head.weight, device="meta"), requires_grad=False)
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts)
    with pytest.raises(ValueError, match=REFUSAL.format(r"parameters on the meta device \(e\.g\. .*lm_head")):
        callback.on_init_end(sft_args(tmp_path), TrainerState(), TrainerControl(), model=model,
                             processing_class=tokenizer)
    assert callback.report is None


@pytest.fixture
def one_process_group(monkeypatch):
    """A real one-process gloo process group (torch's FSDP2 and tensor parallelism need one), torn down after."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # only the model tells here
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_a_model_wrapped_by_fsdp1_is_refused_before_calibration(tiny_model_path, tiny_texts, tmp_path,
                                                                 one_process_group):
    # FSDP1's flat shards are refused; FSDP2 (`fully_shard`) is initialised in place
    # (tests/quailora/test_init_fsdp2.py)
    from torch.distributed.fsdp import FullyShardedDataParallel

    model, tokenizer = lora_model(tiny_model_path)
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts)
    refusal = REFUSAL.format(r"FSDP1 \(`FullyShardedDataParallel`: flat parameter shards\)")
    with pytest.raises(ValueError, match=refusal):
        callback.on_train_begin(sft_args(tmp_path), TrainerState(), TrainerControl(), model=wrapped,
                                processing_class=tokenizer)
    assert callback.report is None
    with pytest.raises(ValueError, match=r"(?s)quailora_init cannot initialise a model under FSDP1.*hf-quailora init"):
        quailora_init(wrapped, tiny_texts, tokenizer=tokenizer)  # called directly: the same refusal, before any work


def test_tensor_parallel_parameters_are_refused_naming_one(tiny_model_path, tiny_texts, tmp_path, one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model, tokenizer = lora_model(tiny_model_path)
    mlp = model.base_model.model.model.layers[0].mlp
    parallelize_module(mlp.gate_proj.base_layer, init_device_mesh("cpu", (1,)), ColwiseParallel())
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts)
    refusal = REFUSAL.format(r"sharded DTensor parameters without FSDP2 .*layers\.0\.mlp\.gate_proj")
    with pytest.raises(ValueError, match=refusal):
        callback.on_train_begin(sft_args(tmp_path), TrainerState(), TrainerControl(), model=model,
                                processing_class=tokenizer)
    assert callback.report is None


@pytest.mark.parametrize("env, refused", [
    ({}, None),  # one process or DDP
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
])
def test_verified_setups_pass_the_recipe_check_and_the_rest_name_hf_quailora_init(tmp_path, monkeypatch, env, refused):
    from hf_quailora.quailora.callback import check_verified_setup

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    if refused is None:
        check_verified_setup(args)
    else:
        with pytest.raises(ValueError, match=f"(?s){refused}.*hf-quailora init"):
            check_verified_setup(args)

"""`QuAILoRAInitCallback`: QuAILoRA initialisation at the start of any Trainer's training.

Example:

```python
from trl import SFTConfig, SFTTrainer
from hf_quailora import QuAILoRAInitCallback

callback = QuAILoRAInitCallback(calibration_dataset=c4_texts, calibration_samples=64, calibration_length=256)
trainer = SFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=data, callbacks=[callback])
trainer.train()  # LoRA factors are set by QuAILoRA before the first step
print(callback.report.summary())
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._io_utils import write_file_atomically
from .._peft_utils import require_lora_layers, unwrap_model
from ..embedded.data import check_token_ids
from .config import QuAILoRAConfig, rename_options
from .init import quailora_init
from .report import QuAILoRAReport


logger = logging.getLogger(__name__)

_SUPPORTED = (
    "Supported: one process, or data parallel (DDP: `accelerate launch` or `torchrun` without FSDP or DeepSpeed), "
    "where every process holds whole parameters. For a sharded run, initialise on one process first "
    "(`quailora_init(model, ...)`, then `model.save_pretrained(folder)`) and start the sharded run from that adapter "
    "(`PeftModel.from_pretrained(base, folder, is_trainable=True)`) without this callback."
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _sharded_setup(args, model: torch.nn.Module) -> str | None:
    """What in this run shards the trainable parameters or keeps its own copy of them; `None` when nothing does.

    Read from the training arguments and `accelerate launch`'s environment (the set-up asked for, even where accelerate
    falls back to plain data parallel, as FSDP does on a CPU) and from the model itself (FSDP-wrapped modules,
    `DTensor` parameters of FSDP2 or tensor parallelism, ZeRO-3's partitioned parameters).
    """
    parameters = list(model.parameters())
    if (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None
            or _env_flag("ACCELERATE_USE_DEEPSPEED") or any(hasattr(p, "ds_id") for p in parameters)):
        return (
            "DeepSpeed: it partitions the parameters (ZeRO-3) or keeps its own fp32 master copy of them (ZeRO-1/2 "
            "and its fp16/bf16 optimizers), made before this callback runs, which overwrites the written factors at "
            "the first optimizer step"
        )
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP (`fsdp` is set in the training arguments or by `accelerate launch`): it shards the parameters"
    if torch.distributed.is_available():
        import torch.distributed.fsdp as fsdp
        from torch.distributed.tensor import DTensor

        # FSDP1's wrapper, and FSDP2's module class (public in torch.distributed.fsdp since torch 2.6)
        names = ("FullyShardedDataParallel", "FSDPModule")
        wrappers = tuple(getattr(fsdp, name) for name in names if hasattr(fsdp, name))
        if any(isinstance(module, wrappers) for module in model.modules()):
            return "FSDP (the model is FSDP-wrapped): it shards the parameters"
        sharded = next((name for name, p in model.named_parameters() if isinstance(p, DTensor)), None)
        if sharded is not None:
            return f"sharded DTensor parameters (tensor parallelism or FSDP2; e.g. {sharded})"
    return None


def check_unsharded_training(args, model: torch.nn.Module) -> None:
    """Raise a `ValueError` naming the set-up when this run shards parameters or re-copies them (FSDP, DeepSpeed).

    `QuAILoRAInitCallback` writes whole factors into each process's parameters in place and broadcasts rank 0's, which
    is right only when every process holds the whole, only copy of each trainable parameter.

    Example:

    ```python
    check_unsharded_training(trainer.args, trainer.model)  # passes for one process and for DDP
    ```
    """
    setup = _sharded_setup(args, model)
    if setup is not None:
        raise ValueError(
            f"QuAILoRAInitCallback cannot initialise under {setup}. It writes whole LoRA factors into every "
            f"process's parameters (`param.data.copy_()`, rank 0's factors broadcast). {_SUPPORTED}"
        )


class QuAILoRAInitCallback(TrainerCallback):
    """Run `quailora_init` on the trainer's model at `on_train_begin`, before the first optimizer step.

    Factors are written in place (`param.data.copy_()`), so the optimizer keeps its Parameters. Under several
    processes each process calibrates on its shard, the Gram matrices are all-reduced, and rank 0's factors are
    broadcast, so every process ends with identical weights. Runs that shard the parameters (FSDP, DeepSpeed ZeRO-3,
    tensor parallelism) or keep their own copy of them (DeepSpeed ZeRO-1/2) are refused at train begin, before any
    calibration: see `check_unsharded_training`. When training resumes from a checkpoint
    (`global_step > 0`) the callback does nothing: the checkpoint's weights are kept.

    Args:
        calibration_dataset (*optional*): texts, token ids, a `datasets.Dataset` with `"text"`/`"input_ids"`, or
            batches. `None` takes batches from the trainer's train dataloader.
        config (`QuAILoRAConfig`, *optional*): the settings; defaults to `QuAILoRAConfig()`.
        full_precision_weights (*optional*): checkpoint folder, Hub id or state dict with the unquantized `W`;
            defaults to where the model was loaded from.
        tokenizer (*optional*): for text calibration; defaults to the trainer's processing class.
        adapter_name (`str`, defaults to `"default"`).
        report_file (`str`, *optional*, defaults to `"quailora_report.json"`): written into `output_dir` by the main
            process (`None`: not written).
        **config_overrides: fields of `QuAILoRAConfig` to change, e.g. `calibration_samples=64,
            calibration_length=256, solver="als"` (the number of calibration sequences counts over all processes);
            the former names (`num_samples`, ...) are taken with a `FutureWarning`.

    Attributes:
        report (`QuAILoRAReport` or `None`): the report of the last initialisation.

    Raises:
        ValueError / TypeError: bad settings, at construction; at train begin, before any calibration, a run that
            shards the parameters or keeps its own copy of them (FSDP, DeepSpeed, tensor parallelism), and the checks
            of `quailora_init`.

    Example:

    ```python
    trainer = SFTTrainer(..., callbacks=[QuAILoRAInitCallback(calibration_dataset=texts, solver="als")])
    ```
    """

    def __init__(
        self,
        calibration_dataset=None,
        config: QuAILoRAConfig | None = None,
        full_precision_weights=None,
        tokenizer=None,
        adapter_name: str = "default",
        report_file: str | None = "quailora_report.json",
        **config_overrides,
    ):
        # Hyperparameters (QuAILoRAConfig's own defaults and checks; nothing re-declared here)
        if config is not None and not isinstance(config, QuAILoRAConfig):
            raise TypeError(f"`config` must be a QuAILoRAConfig, got {type(config).__name__}.")
        config_overrides = rename_options(config_overrides)
        fields = {f.name for f in dataclasses.fields(QuAILoRAConfig)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise TypeError(f"QuAILoRAInitCallback got unknown settings {unknown}; QuAILoRAConfig has {sorted(fields)}.")
        config = dataclasses.replace(config if config is not None else QuAILoRAConfig(), **config_overrides)
        if isinstance(calibration_dataset, str):
            raise TypeError(
                f"`calibration_dataset` must hold calibration data, not a name; for a named dataset pass "
                f"load_dataset_any({calibration_dataset!r})."
            )
        if isinstance(calibration_dataset, torch.Tensor):
            check_token_ids(calibration_dataset, name="calibration_dataset")
        if calibration_dataset is not None and hasattr(calibration_dataset, "__len__") and len(calibration_dataset) == 0:
            raise ValueError("`calibration_dataset` is empty; give calibration texts or leave it None.")
        self.config = config
        self.calibration_dataset = calibration_dataset
        self.full_precision_weights = full_precision_weights
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.report_file = report_file
        # Internal state
        self.report: QuAILoRAReport | None = None

    def _calibration_for_this_process(self, train_dataloader):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.calibration_dataset is None:
            if train_dataloader is None:
                raise ValueError("QuAILoRAInitCallback has no calibration_dataset and the trainer no train dataloader.")
            # Already sharded per process by accelerate: take this process's share of calibration_samples.
            samples = self.config.calibration_samples
            per_process = None if samples is None else -(-samples // world)
            return train_dataloader, dataclasses.replace(self.config, calibration_samples=per_process)
        data = self.calibration_dataset
        indexable = isinstance(data, torch.Tensor) or hasattr(data, "select") or (
            isinstance(data, list) and all(isinstance(item, str) for item in data)
        )
        total = min(self.config.calibration_samples or len(data), len(data)) if indexable else 0
        # Shard only when every process gets at least one sample; otherwise every process calibrates on all of it,
        # which gives the same normalised H (matrices and token counts are both summed) and keeps every process in
        # the collectives (a process raising "empty" alone would leave the others waiting in all_reduce).
        if world > 1 and indexable and total >= world:
            indices = list(range(rank, total, world))
            if isinstance(data, torch.Tensor):
                data = data[indices]
            elif hasattr(data, "select"):
                data = data.select(indices)
            else:
                data = [data[i] for i in indices]
        return data, self.config

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        if state.global_step > 0:
            logger.info("Resuming at step %d: QuAILoRA initialisation skipped (checkpoint weights kept).", state.global_step)
            return
        check_unsharded_training(args, model)  # before unwrapping: FSDP wraps the model itself
        model = unwrap_model(model)
        require_lora_layers(model, self.adapter_name)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        calibration, config = self._calibration_for_this_process(train_dataloader)
        self.report = quailora_init(
            model,
            calibration,
            config,
            tokenizer=tokenizer,
            full_precision_weights=self.full_precision_weights,
            adapter_name=self.adapter_name,
        )
        if state.is_world_process_zero:
            logger.info(self.report.summary())
            if self.report_file and args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                text = json.dumps(self.report.to_dict(), indent=1)
                write_file_atomically(os.path.join(args.output_dir, self.report_file),
                                      lambda tmp: Path(tmp).write_text(text))

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
from .first_step import DEFAULT_BUDGET
from .init import quailora_init
from .lr_rule import apply_lr_scale, resolve_lr_scale
from .placement import aim_at_training
from .report import QuAILoRAReport
from .sharded import unsupported_sharding
from .step_ratio import quailora_step_ratio


logger = logging.getLogger(__name__)

_SUPPORTED = (
    "Supported in process: one process, DDP (`accelerate launch` or `torchrun` without FSDP or DeepSpeed), a model "
    "sharded by FSDP2 (`fully_shard`, or transformers' `DistributedConfig` at load), and FSDP or DeepSpeed asked for "
    "in the training arguments or by `accelerate launch` while every process still holds whole weights when the "
    "Trainer is built (the callback then initialises at `on_init_end`, before the Trainer wraps the model). For a "
    "model sharded by FSDP1, partitioned or left on the meta device at load time, initialise on one process "
    "first with `hf-quailora init` (it writes the QuAILoRA start as a peft adapter folder) and start the sharded run "
    "from that folder without this callback; see docs/launchers.md."
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _wrapping_setup(args) -> str | None:
    """The set-up the Trainer will wrap the model in at `train()` (FSDP, DeepSpeed), as the training arguments and
    `accelerate launch`'s environment ask for it (even where accelerate falls back to plain data parallel, as FSDP
    does on a CPU); `None` for one process or DDP."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None or _env_flag(
            "ACCELERATE_USE_DEEPSPEED"):
        return (
            "DeepSpeed: it partitions the parameters (ZeRO-3) or keeps its own fp32 master copy of them (ZeRO-1/2 "
            "and its fp16/bf16 optimizers), made before `on_train_begin`, which overwrites factors written there at "
            "the first optimizer step"
        )
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP (`fsdp` is set in the training arguments or by `accelerate launch`): it shards the parameters"
    return None


def _sharded_model(model: torch.nn.Module) -> str | None:
    """What in the model itself hides whole weights from this process in a way the in-process init cannot take (FSDP1's
    flat shards, ZeRO-3's partitions, meta weights, tensor parallelism); `None` when every parameter is whole or the
    model is FSDP2-sharded, which `quailora_init` initialises in place (`quailora/sharded.py`)."""
    return unsupported_sharding(model)


def _sharded_setup(args, model: torch.nn.Module) -> str | None:
    """What in this run shards the trainable parameters or keeps its own copy of them; `None` when nothing does.

    Read from the training arguments and `accelerate launch`'s environment, and from the model itself.
    """
    return _sharded_model(model) or _wrapping_setup(args)


def _refuse(setup: str) -> ValueError:
    return ValueError(
        f"QuAILoRAInitCallback cannot initialise under {setup}. It writes LoRA factors in place into every "
        f"process's parameters (whole ones, or FSDP2's `DTensor` shards; process 0's factors). {_SUPPORTED}"
    )


def check_unsharded_training(args, model: torch.nn.Module) -> None:
    """Raise a `ValueError` naming the set-up when this run shards parameters in a way the in-process init cannot
    write (FSDP1, ZeRO-3, meta weights, tensor parallelism) or will wrap the model later (FSDP, DeepSpeed).

    `QuAILoRAInitCallback` writes process 0's factors in place into each process's parameters: whole ones (then
    broadcast), or the shards of FSDP2's `DTensor`s. That is right when every process holds the whole, only copy of
    each trainable parameter, or its FSDP2 shard.

    Example:

    ```python
    check_unsharded_training(trainer.args, trainer.model)  # passes for one process, DDP and an FSDP2 model
    ```
    """
    setup = _sharded_setup(args, model)
    if setup is not None:
        raise _refuse(setup)


def _zero_stage(args) -> int | None:
    """The ZeRO stage DeepSpeed is asked for, by the training arguments or `accelerate launch`; `None` without it."""
    hf_config = getattr(args, "hf_deepspeed_config", None)  # set by TrainingArguments from `deepspeed`
    if hf_config is not None:
        return int(hf_config.get_value("zero_optimization.stage", 0) or 0)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage)
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return None


def check_verified_setup(args) -> None:
    """Raise a `ValueError` before anything loads when a run asks for a set-up that the in-process init (`on_init_end`,
    before the Trainer wraps the model) has not been verified under end to end: FSDP (accelerate does not wrap on a
    CPU, so no test reaches the wrap), and DeepSpeed ZeRO-3 (transformers partitions the model as it loads it, so
    no process holds whole weights). One process, DDP and DeepSpeed ZeRO-1/2 pass (see docs/launchers.md).

    Args:
        args (`TrainingArguments`): the run's training arguments (`accelerate launch`'s environment is read too).

    Raises:
        ValueError: FSDP or ZeRO-3, naming `hf-quailora init` (the route that works).

    Example:

    ```python
    check_verified_setup(training_args)  # in a recipe, before the model loads
    ```
    """
    stage = _zero_stage(args)
    if stage is not None and stage >= 3:
        raise _refuse("DeepSpeed ZeRO-3 (transformers partitions the parameters as the model loads)")
    if stage is None and _wrapping_setup(args) is not None:
        raise _refuse(_wrapping_setup(args))


class QuAILoRAInitCallback(TrainerCallback):
    """Run `quailora_init` on the trainer's model before the first optimizer step: at `on_train_begin` for one process,
    DDP and a model already sharded by FSDP2, at `on_init_end` (before the Trainer wraps the model) when FSDP or
    DeepSpeed is asked for.

    Factors are written in place, so the optimizer keeps its Parameters. Under several processes each process
    calibrates on its shard, the Gram matrices are all-reduced, and rank 0's factors are broadcast, so every process
    ends with identical weights. A model sharded by FSDP2 before the Trainer sees it (`fully_shard`, or transformers'
    `DistributedConfig` at load, where the Trainer does not wrap it again) is initialised in place at
    `on_train_begin`: every process runs the calibration forward, each layer's whole `Q` is gathered in turn, every
    process solves, and the `DTensor` factors receive their shards of process 0's factors (`quailora/sharded.py`).
    Under FSDP or DeepSpeed asked for in the training arguments or by `accelerate launch`, the Trainer wraps the model
    inside `train()`, so the callback initialises at `on_init_end`, while every process still holds whole weights (or
    FSDP2 shards), and needs `calibration_dataset`. A model sharded by FSDP1, partitioned (ZeRO-3 at load), on the
    meta device (rank-0-only loading) or tensor-parallel is refused with an error naming `hf-quailora init`. When
    training resumes from a checkpoint (`global_step > 0`, or `resume_from_checkpoint` in the arguments of a wrapped
    run) the checkpoint's weights are kept.

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
        step_ratio (`float` or `None`): the start's `quailora_step_ratio` (how much further an Adam step moves the
            product than from peft's default start), logged; a diagnostic, not a rule (docs/quailora.md).
        lr_scale (`float` or `None`): what the learning rate was multiplied by (`config.lr_scale`; "auto" measured
            by `quailora_lr_scale`), applied at `on_train_begin`.
        first_step (`FirstStep` or `None`): what `lr_scale="auto"` measured (the correction and the first step, in
            KL), when it did.

    Raises:
        ValueError / TypeError: bad settings, at construction; before any calibration, a model whose weights this
            process does not hold whole or as FSDP2 shards (FSDP1, partitioned, on the meta device, tensor-parallel:
            at `on_init_end` or `on_train_begin`), a wrapped run without `calibration_dataset`, and the checks of
            `quailora_init`.

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
        self._initialised = False  # done at on_init_end (a wrapped run), so on_train_begin has nothing to do
        self.step_ratio: float | None = None  # the start's `quailora_step_ratio`
        self.lr_scale: float | None = None  # what `config.lr_scale` gave for the start, applied at on_train_begin
        self.first_step = None  # `FirstStep` of lr_scale="auto"
        self._scaled = False  # the rate of this run was scaled (once per initialisation, never on a resume)

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

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        # FSDP and DeepSpeed wrap the model inside `train()`, before `on_train_begin`: the end of the Trainer's
        # set-up is the last moment every process holds whole weights, so such runs initialise here. One process
        # and DDP wait for `on_train_begin`, which knows whether training resumes and has the train dataloader.
        self._initialised = False
        setup = _wrapping_setup(args)
        if model is None or setup is None:
            return
        hidden = _sharded_model(model)
        if hidden is not None:
            raise _refuse(hidden)
        if getattr(args, "resume_from_checkpoint", None):
            logger.info("resume_from_checkpoint is set: QuAILoRA initialisation skipped (checkpoint weights kept).")
            self._initialised = True
            return
        if self.calibration_dataset is None:
            raise ValueError(
                "QuAILoRAInitCallback initialises before the Trainer wraps the model (FSDP or DeepSpeed was asked "
                "for), when no train dataloader exists yet: pass `calibration_dataset`."
            )
        # A run resumed through `trainer.train(resume_from_checkpoint=...)` calibrates here for nothing: loading the
        # checkpoint then replaces the factors, so its weights are kept all the same.
        self._initialise(args, state, model, processing_class, None, wrapped=True)
        self._initialised = True

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        if state.global_step > 0:  # the checkpoint's weights, and its optimizer's and scheduler's rates, are kept
            logger.info("Resuming at step %d: QuAILoRA initialisation skipped (checkpoint weights kept).", state.global_step)
            return
        if not self._initialised:  # else done at on_init_end, before the Trainer wrapped the model
            check_unsharded_training(args, model)  # before unwrapping: FSDP wraps the model itself
            self._initialise(args, state, model, processing_class, train_dataloader)
        self._apply_lr_scale(kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def _apply_lr_scale(self, optimizer, lr_scheduler) -> None:
        """`self.lr_scale` on the created optimizer and scheduler (once per initialisation; not on a resume)."""
        if self.lr_scale is not None and self.lr_scale != 1 and not self._scaled:
            apply_lr_scale(optimizer, lr_scheduler, self.lr_scale, self.config.lr_scale, auto=self.first_step is not None)
            self._scaled = True

    def _resolve_lr_scale(self, args, model, calibration, tokenizer, wrapped: bool, train_dataloader=None) -> None:
        """`config.lr_scale` → `self.lr_scale` for this start (every process: "auto" all-reduces under DDP)."""
        self._scaled = False
        self.lr_scale, self.first_step = resolve_lr_scale(
            self.config, args.learning_rate, model, train_dataloader if train_dataloader is not None else calibration,
            tokenizer, wrapped, self.adapter_name)

    def _initialise(self, args, state, model, processing_class, train_dataloader, wrapped: bool = False) -> None:
        model = unwrap_model(model)
        require_lora_layers(model, self.adapter_name)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        calibration, config = self._calibration_for_this_process(train_dataloader)
        with aim_at_training(args):  # "auto" keeps the init under this run's own training step (placement.py)
            self.report = quailora_init(model, calibration, config, tokenizer=tokenizer,
                                        full_precision_weights=self.full_precision_weights,
                                        adapter_name=self.adapter_name)
        self.step_ratio = quailora_step_ratio(model, self.adapter_name)  # every process: FSDP2 gathers the factors
        self._resolve_lr_scale(args, model, calibration, tokenizer, wrapped, train_dataloader)
        if state.is_world_process_zero:
            logger.info(self.report.summary())
            logger.info("QuAILoRA start: the first Adam steps move the LoRA product %.2fx as far as from peft's default "
                        "start at the same learning rate (quailora_step_ratio; docs/quailora.md).", self.step_ratio)
            if self.first_step is not None:
                step = self.first_step
                ratios = ", ".join(f"x{scale:g}: {step.ratio(scale):.3f}" for scale in step.step_kl)
                fits = step.ratio(self.lr_scale) <= DEFAULT_BUDGET
                logger.info("QuAILoRA start: its correction is %.4g nats of KL; Adam's first step at lr %g times "
                            "(%s) moves it that fraction of it -> learning rate x %g (lr_scale='auto': %s %g; "
                            "lr_scale=1 keeps it).", step.correction_kl, step.learning_rate, ratios, self.lr_scale,
                            "the largest within" if fits else "the smallest factor; none is within", DEFAULT_BUDGET)
            elif self.lr_scale != 1:
                logger.info("QuAILoRA start: learning rate x %g (lr_scale).", self.lr_scale)
            if self.report_file and args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                text = json.dumps(self.report.to_dict(), indent=1)
                write_file_atomically(os.path.join(args.output_dir, self.report_file),
                                      lambda tmp: Path(tmp).write_text(text))

"""A test-only axolotl plugin that records what each process of an `axolotl train` run held, for
tests/integrations/test_axolotl.py.

Listed after `QuAILoRAPlugin` in the YAML's `plugins:` (as `axolotl_probe.ProbePlugin`: tests/scripts is on the path of
tests/scripts/axolotl_ddp.py), it adds a callback once the trainer exists, so its `on_train_begin` runs after
`QuAILoRAInitCallback`'s. Each process writes `probe-{process}.pt` into axolotl's `output_dir`: the LoRA factors right
after the init and at the end; how the run was distributed (world size, the Trainer's parallel mode, the wrapper
class, train batches on this process); the dynamic-rank trainer's rank history, scaling and max rank; the init's
calibration token count (all-reduced over the processes).
"""

import os

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


def _lora_factors(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().float().clone() for name, param in model.named_parameters() if "lora_" in name}


class ProbeCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.begin: dict = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.begin = {"init": _lora_factors(model), "batches": len(train_dataloader), "args_world": args.world_size,
                      "parallel_mode": args.parallel_mode.value}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from hf_quailora import QuAILoRAInitCallback

        trainer = self.trainer
        quailora = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QuAILoRAInitCallback)]
        distributed = torch.distributed.is_initialized()
        process = torch.distributed.get_rank() if distributed else 0
        torch.save({
            **self.begin,
            "world": torch.distributed.get_world_size() if distributed else 1,
            "wrapped": type(trainer.model_wrapped).__name__,
            "final": _lora_factors(model),
            "rank_history": list(getattr(trainer, "rank_history", [])),
            "rank_scaling": getattr(trainer, "rank_scaling", None),
            "max_rank": getattr(trainer, "max_rank", None),
            "tokens": quailora[0].report.num_tokens if quailora and quailora[0].report is not None else None,
        }, os.path.join(args.output_dir, f"probe-{process}.pt"))


class ProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        return [ProbeCallback(trainer)]

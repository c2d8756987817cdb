"""Checkpoints of `DynamicRankMixin` that a kill at any moment never leaves half-written, and resume exactly.

- `save_checkpoint_atomically`: transformers writes a checkpoint file by file into `checkpoint-N` (the adapter, then
  the optimizer, scheduler, RNG and trainer state) and then rotates old ones away, so a process killed half way
  (SIGKILL, the OOM killer, a preemption) used to leave a `checkpoint-N` that `resume_from_checkpoint=True` picked
  and could not load, and with `save_total_limit` the earlier complete one could already be gone. Here every process
  writes the whole checkpoint, the rank sampler's state included, into a hidden `.checkpoint-N.staging/` folder
  beside it; once all are done, process 0 renames it to `checkpoint-N` in one step, and only then are old
  checkpoints rotated. A kill leaves either no `checkpoint-N` or a complete one, and the previous one is intact.
- `remove_stale_staging`: at `train()` start, the staging folders a killed run left behind are removed.
- `keep_parameter_dtypes`: transformers resumes a peft model with peft's `load_adapter`, which upcasts float16 and
  bfloat16 adapter weights to float32 (its `autocast_adapter_dtype`), so a resumed run trained at another precision
  than the run it resumes (and ended at another adapter); the trainable parameters get their dtypes back.
- `load_rank_state`: restores the rank sampler (its generator state) and the rank history, so a resumed run draws the
  same ranks as one that never stopped.

Checked by killing runs at random moments: tests/test_faults_kill.py and bench/bench_faults.py (docs/limits.md,
"Faults").

Example:

```python
def _save_checkpoint(self, model, trial):  # in a Trainer subclass
    save_checkpoint_atomically(self, trial, functools.partial(super()._save_checkpoint, model, trial))
```
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .._dist_utils import is_distributed, naming_collective, run_on_main_process
from .._io_utils import raise_if_disk_full, tree_bytes, write_file_atomically


RANK_STATE_NAME = "dynamic_rank_state.pt"
STAGING_SUFFIX = ".staging"


def staging_folder(run_dir: str, step: int) -> str:
    """The hidden folder a checkpoint of `step` is written into before it is published (the same on every process)."""
    return os.path.join(run_dir, f".{PREFIX_CHECKPOINT_DIR}-{step}{STAGING_SUFFIX}")


def remove_stale_staging(output_dir: str) -> None:
    """Remove the staging folders of checkpoints a killed run was writing (never loaded, only disk space)."""
    if os.path.isdir(output_dir):
        for entry in Path(output_dir).glob(f".{PREFIX_CHECKPOINT_DIR}-*{STAGING_SUFFIX}"):
            shutil.rmtree(entry, ignore_errors=True)


def _publish(staged: str, final: str) -> None:
    if os.path.exists(final):  # a checkpoint of the same step from an earlier run (resumed from before it)
        old = f"{staged}.old"
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)  # one rename: checkpoint-N appears complete


def save_checkpoint_atomically(trainer, trial, save: Callable[[], None]) -> None:
    """Run transformers' checkpoint save `save` into a staging folder, add the rank state, then publish and rotate.

    While `save` runs, `trainer._checkpoint_staging` is the run folder it sees (`DynamicRankMixin._get_output_dir`
    returns it), so transformers writes `staging/checkpoint-N` and rotates nothing (the staging folder holds one
    checkpoint). A failure removes the staging folder (a full disk raises `DiskFullError` naming `checkpoint-N`).

    Args:
        trainer: the `DynamicRankMixin` trainer.
        trial: the hyperparameter-search trial, as transformers passes it.
        save (`Callable[[], None]`): transformers' own `_save_checkpoint(model, trial)`.

    Raises:
        DiskFullError: the disk or quota filled; the earlier checkpoints are intact.
    """
    run_dir = trainer._get_output_dir(trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    root = staging_folder(run_dir, trainer.state.global_step)
    staged, final = os.path.join(root, name), os.path.join(run_dir, name)
    trainer._checkpoint_staging = root
    try:
        save()
        if trainer.args.should_save:
            _fix_best_checkpoint(trainer, staged, final)
            state = rank_state(trainer)
            write_file_atomically(os.path.join(staged, RANK_STATE_NAME), lambda tmp: torch.save(state, tmp))
        if is_distributed():  # every process has written its files (RNG state, shards) into staging
            with naming_collective(f"the wait for every process to write {name}"):
                torch.distributed.barrier()
        run_on_main_process(lambda: _publish(staged, final) if trainer.args.should_save else None,
                            what="publishing the checkpoint")
    except BaseException as error:
        written = tree_bytes(root)
        if trainer.args.should_save:
            shutil.rmtree(root, ignore_errors=True)
        if isinstance(error, Exception):
            raise_if_disk_full(error, final, lambda: (written, _last_checkpoint_bytes(run_dir)))
        raise
    finally:
        trainer._checkpoint_staging = None
    if trainer.args.should_save:
        shutil.rmtree(root, ignore_errors=True)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)


def _last_checkpoint_bytes(run_dir: str) -> int:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    return tree_bytes(last) if last else 0


def _fix_best_checkpoint(trainer, staged: str, final: str) -> None:
    """transformers records the best checkpoint by the path it wrote: name the published one instead."""
    if trainer.state.best_model_checkpoint == staged:
        trainer.state.best_model_checkpoint = final
        trainer.state.save_to_json(os.path.join(staged, "trainer_state.json"))


def rank_state(trainer) -> dict:
    """What `RANK_STATE_NAME` holds: the rank sampler's state (its generator's too) and the `[step, rank]` history."""
    return {"sampler": trainer.rank_sampler.state_dict(),
            "rank_history": [list(item) for item in trainer.rank_history]}


def load_rank_state(trainer, checkpoint: str) -> None:
    """Restore the rank sampler and the rank history of `trainer` from `checkpoint`.

    Raises:
        ValueError: the checkpoint has no rank state, or was written with another rank range or distribution.
    """
    path = os.path.join(checkpoint, RANK_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"Checkpoint {checkpoint} has no {RANK_STATE_NAME}: it was not written by DynamicRankTrainer, so the "
            "rank sequence cannot be resumed. Resume from a DynamicRankTrainer checkpoint or start a new run."
        )
    state = torch.load(path, weights_only=True)
    try:
        trainer.rank_sampler.load_state_dict(state["sampler"])
    except ValueError as error:
        raise ValueError(f"Cannot resume from {checkpoint}: {error}") from None
    trainer.rank_history = [list(item) for item in state["rank_history"]]


@contextlib.contextmanager
def keep_parameter_dtypes(model: torch.nn.Module) -> Iterator[None]:
    """Give the trainable parameters of `model` back the dtypes they had before the block (a checkpoint load).

    Casting back is exact: the checkpoint holds the values in the original dtype, and the load only widened them.
    """
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])

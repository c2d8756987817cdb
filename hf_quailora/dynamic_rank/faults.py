"""What a dynamic-rank run does when something goes wrong: a non-finite step, a full disk, another run's folder.

- `NonFiniteCheck`: a loss or gradient that is not finite stops the run with a `FloatingPointError` naming the
  optimizer step, the rank(s) of its plan and what was not finite, before the optimizer applies the step, so the
  weights and the last checkpoint stay as they were (`DynamicRankConfig(nonfinite="skip")` drops the step with a
  warning instead). Stopping is the default because a skipped step is easy to miss in a log, and a run whose loss
  went NaN once usually diverged: its later checkpoints would be silently worse than the last good one.
- `hold_output_dir`: one run per `output_dir`. A lock file (`.hf_quailora.lock`, with the holder's pid, host and
  start time) locked with `fcntl.flock`, which the operating system releases when the process dies, so a killed
  run's leftover never blocks the next one (it is taken over with a warning).
- A checkpoint save that fails or is killed never leaves a half-written `checkpoint-N` (checkpoints.py).

See docs/limits.md ("Faults") for what is covered and what is not yet.

Example:

```python
from hf_quailora.dynamic_rank.faults import OutputDirInUseError, hold_output_dir

with hold_output_dir("outputs/run-1"):  # OutputDirInUseError while another live run holds it
    ...
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .._dist_utils import _collective_device, _is_dtensor, is_distributed, run_on_main_process


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf_quailora.lock"
NONFINITE_ACTIONS = ("raise", "skip")


# ---------------------------------------------------------------------------------------------------------------------
# A non-finite loss or gradient


def _gradients_are_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad.to_local() if _is_dtensor(p.grad) else p.grad
             for p in model.parameters() if p.requires_grad and p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads]).all())


class NonFiniteCheck(TrainerCallback):
    """Checks every sub-model's loss (`check_loss`, called by the mixin's `training_step`) and, before the optimizer
    step, the gradients of the trainable parameters; on a non-finite value raises or skips the step.

    Under `torch.distributed` the verdict is all-reduced, so every process raises (or skips) at the same step. Under
    fp16 with a gradient scaler the gradient check is left to the scaler (it skips overflowing steps by design).

    Args:
        trainer: the `DynamicRankMixin` trainer (its `_plan` names the step's ranks).
        action (`str`, defaults to `"raise"`): `"raise"` a `FloatingPointError`, or `"skip"` the optimizer step with
            a warning (the gradients are dropped, so the optimizer leaves the weights and its state alone).

    Raises:
        FloatingPointError: with `action="raise"`, from `on_pre_optimizer_step`.

    Example: `trainer.add_callback(NonFiniteCheck(trainer))` (`DynamicRankMixin` does it).
    """

    def __init__(self, trainer, action: str = "raise"):
        self.trainer, self.action = trainer, action
        self._bad_losses: list[tuple[int, float]] = []  # (rank, loss) of this optimizer step's non-finite losses

    def check_loss(self, loss: torch.Tensor, rank: int) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_losses.append((rank, float(loss.detach().float().sum())))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        scaler = getattr(trainer.accelerator, "scaler", None)
        flags = torch.tensor([float(bool(self._bad_losses)),
                              float(scaler is None and not _gradients_are_finite(trainer.model))])
        if is_distributed():
            flags = flags.to(_collective_device())
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_losses, self._bad_losses = self._bad_losses, []
        loss_bad, grad_bad = (bool(flag) for flag in flags.tolist())
        if not (loss_bad or grad_bad):
            return
        message = self._describe(state.global_step + 1, bad_losses, loss_bad, grad_bad, args.output_dir)
        if self.action == "raise":
            raise FloatingPointError(f"{message} The step was not applied. {self._fix(args.output_dir)}")
        logger.warning("%s Skipping the step (nonfinite='skip'): the weights and optimizer state stay as they were.",
                       message)
        if scaler is None:  # a scaler skips the step itself; without one, no gradient means no update
            for parameter in trainer.model.parameters():
                parameter.grad = None

    def _describe(self, step: int, bad_losses, loss_bad: bool, grad_bad: bool, output_dir: str) -> str:
        plan = ", ".join(f"r{sub.rank}" + ("" if sub.weight == 1.0 else f" (weight {sub.weight:g})")
                         for sub in self.trainer._plan or [])
        what = []
        if bad_losses:
            what.append("the loss was " + ", ".join(f"{loss} at rank {rank}" for rank, loss in bad_losses))
        elif loss_bad:
            what.append("the loss was not finite on another process")
        if grad_bad:
            what.append("the gradient of the trainable parameters was not finite")
        return f"Optimizer step {step} (rank plan: {plan or 'none'}): {' and '.join(what)}."

    @staticmethod
    def _fix(output_dir: str) -> str:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        where = f"The last checkpoint, {last}, is intact: resume from it" if last else "Restart"
        return (f"{where} with a lower learning_rate, a max_grad_norm, fp32/bf16 instead of fp16, or check the data "
                "of this step; or set nonfinite='skip' to drop such steps with a warning.")


# ---------------------------------------------------------------------------------------------------------------------
# Two runs, one output folder


class OutputDirInUseError(RuntimeError):
    """Another live run holds the lock of this `output_dir`."""


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:
        return {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on host {holder.get('host')}, started {started} ({holder.get('command')})"


class OutputDirLock:
    """An exclusive lock on `folder` (the file `folder/.hf_quailora.lock`), held from `acquire` to `release`.

    Args:
        folder (`str` or `os.PathLike`): the run's output folder; created if missing (and removed again on release
            when it is still empty).

    Raises:
        OutputDirInUseError: from `acquire`, naming the holder (pid, host, start time, command).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> OutputDirLock:
        if fcntl is None:
            logger.warning("No fcntl on this platform: %s is not locked against a second run.", self.folder)
            return self
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputDirInUseError(
                    f"output_dir {self.folder} is in use by another run: {_describe_holder(holder)}. Wait for it to "
                    "end or stop it, or choose another output_dir."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # else the holder removed the file as we opened it: lock the new one
            os.close(fd)
        if previous := _holder(fd):  # a lock file left by a run that died without releasing it
            logger.warning("Taking over the lock of %s: %s is no longer running.", self.folder,
                           _describe_holder(previous))
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: the next run starts from a fresh file
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._created_folder and not any(self.folder.iterdir()):
            self.folder.rmdir()


@contextlib.contextmanager
def hold_output_dir(folder: str | os.PathLike) -> Iterator[OutputDirLock | None]:
    """Hold `folder`'s lock for the duration of the block (process 0 of a `torch.distributed` run takes it for the
    whole run: a second run is refused, not a second process of this one).

    Args:
        folder (`str` or `os.PathLike`): the run's `output_dir`.

    Raises:
        OutputDirInUseError: another live run holds it (raised on every process of this run).

    Example: `with hold_output_dir(args.output_dir): trainer.train()`.
    """
    lock = OutputDirLock(folder)
    held = run_on_main_process(lock.acquire, what=f"locking output_dir {folder}")
    try:
        yield held
    finally:
        lock.release()

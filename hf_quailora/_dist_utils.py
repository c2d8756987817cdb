"""Sharded models outside `forward`: whole tensors from FSDP2's `DTensor`s, and writes by one process that every
process waits for and whose failure raises on all of them.

Example:

```python
state = {name: full_tensor(value) for name, value in model.state_dict().items()}  # on every process
run_on_main_process(lambda: save_file(state, path))  # process 0 writes, the others wait; a failure raises on all
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch


T = TypeVar("T")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_dtensor(tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_fsdp1(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` (FSDP2, tensor parallelism) or `model` holds FSDP1
    `FullyShardedDataParallel` modules (flat shards outside `forward`): gathers are then collectives."""
    return any(_is_dtensor(p) for p in model.parameters()) or has_fsdp1_modules(model)


def has_fsdp1_modules(model: torch.nn.Module) -> bool:
    """Whether `model` is or holds an FSDP1 `FullyShardedDataParallel` module."""
    return any(_is_fsdp1(m) for m in model.modules())


def unwrap_fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside an FSDP1 root (`FullyShardedDataParallel(peft_model)`); any other model unchanged."""
    return model.module if _is_fsdp1(model) else model


def unwrapped_name(name: str) -> str:
    """A module name without FSDP1's `_fsdp_wrapped_module.` parts: the name in a full state dict."""
    return name.replace("_fsdp_wrapped_module.", "")


def full_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a model holding FSDP1 `FullyShardedDataParallel` modules, gathered whole on every
    process with clean names (a collective: every process must call it); the frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    return {name: value.detach().clone() for name, value in get_model_state_dict(model, options=options).items()}


def has_partitioned_parameters(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is DeepSpeed ZeRO-3's (`ds_id`): gathering it is then a collective."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def gathered_parameters(parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block, ZeRO-3's partitioned parameters among `parameters` are whole, for reading (a collective:
    every process must enter it, with the same parameters); any other parameter is left as it is."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a `DTensor` is gathered (a collective: every process must call it, in the same order)."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_on_main_process(fn: Callable[[], T], what: str = "writing") -> T | None:
    """Run `fn` on process 0 only; every other process waits for it, and a failure there raises on every process.

    Outside `torch.distributed` it simply runs `fn`. The wait is one all-reduce of a failure flag (so it ends
    within the process group's timeout even when process 0 dies).

    Args:
        fn (`Callable[[], T]`): the work of process 0 (a write).
        what (`str`, defaults to `"writing"`): named in the error the other processes raise.

    Returns:
        What `fn` returned on process 0; `None` on the others.

    Raises:
        Whatever `fn` raised, on process 0; `RuntimeError` on the others.

    Example:

    ```python
    run_on_main_process(lambda: save_file(state, path), what="export_rank")
    ```
    """
    if not is_distributed():
        return fn()
    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # raised after the others have heard of it
            error = exc
    failed = torch.tensor([float(error is not None)], device=_collective_device())
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"{what} failed on process 0; see its error.")
    return result


@contextmanager
def naming_collective(what: str) -> Iterator[None]:
    """Re-raise a collective that failed inside the block (another process died, or the process group timed out) as a
    `RuntimeError` that names `what`, this process, and the bound on such a wait.

    A dead process closes its connections: gloo and NCCL then fail the collective on the others at once. A process
    that is alive but stuck is waited for until the process group's timeout: `ddp_timeout` of the training arguments
    (seconds; transformers' default 1800), which transformers does not pass on a CPU (`use_cpu=True`): there, call
    `torch.distributed.init_process_group("gloo", timeout=...)` before building the training arguments.

    Example:

    ```python
    with naming_collective("the all-reduce of the QuAILoRA init's Gram matrices"):
        torch.distributed.all_reduce(matrix)
    ```
    """
    try:
        yield
    except RuntimeError as error:  # DistBackendError is one; gloo reports a closed connection as a plain one
        if not is_distributed():
            raise
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        raise RuntimeError(
            f"Process {rank} of {world}: {what} failed, most likely because another process of this run died or "
            "stopped answering; its log says why. This process stops too. (A process alive but stuck is waited for up "
            "to the process group's timeout: `ddp_timeout` of the training arguments, or on a CPU, where transformers "
            f"does not pass it, `timeout=` of `torch.distributed.init_process_group`.) The collective's error: {error}"
        ) from error

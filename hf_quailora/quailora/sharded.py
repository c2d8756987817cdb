"""QuAILoRA's init on an FSDP2 (`fully_shard`) model, in process: whole weights one layer at a time, sharded writes.

FSDP2 keeps each parameter as a `DTensor` shard outside `forward`. `quailora_init` runs on such a model as on a whole
one, with four differences, all here:

1. *Calibration* is unchanged: every process runs the calibration forward (FSDP2 all-gathers each block's weights
   inside it; `equalize_batch_counts` gives every process the same number of forwards) and the Gram matrices are
   all-reduced, so every process holds the same `H`.
2. *The weights of one layer*: `Q` is gathered whole by the backend's own dequantization (bitsandbytes gathers the
   layer's codes; its quant state is whole on every process), `W` is read from the checkpoint by every process.
   Only one layer's whole `Q`, `W` and `E` are alive at a time, and the solves run in the main thread (no overlap with
   calibration: the gather is a collective, and collectives must come in the same order on every process).
3. *Every process solves* the same problem (same `H`, `W`, `Q`), and each layer's outcome is agreed on (one
   all-reduce of a failure flag), so a failure on one process raises on every process instead of leaving the
   others in the next gather. Solving everywhere costs no wall time (the other processes would wait for process 0)
   and no traffic beyond the gather each needs anyway, and each process holds one layer's solve workspace, as under
   DDP; see `write_sharded` for why process 0's factors are still the ones written.
4. *The write*: FSDP2 modules are resharded first (an unsharded parameter would be overwritten by the next
   all-gather), then each `DTensor` factor receives its shard of process 0's factors, with the parameter's own
   mesh and placements, copied in place (the optimizer keeps its Parameters). Factors that are not `DTensor`s (an
   FSDP2 base sharded at load time, with LoRA added afterwards, leaves them whole) are written and broadcast as
   under DDP.

What this does not take: FSDP1's flat parameters, DeepSpeed ZeRO-3's partitions, weights on the meta device, and
`DTensor` parameters outside FSDP2 (tensor parallelism, not verified): `unsupported_sharding` names them, and the
callers refuse them, naming `hf-quailora init`.

Example:

```python
model = get_peft_model(load_quantized_model(path, "nf4")[0], LoraConfig(r=16, target_modules="all-linear"))
for block in model.base_model.model.model.layers:
    fully_shard(block)
fully_shard(model)
report = quailora_init(model, my_share_of_texts, tokenizer=tokenizer)  # on every process
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .._dist_utils import _collective_device, _is_dtensor, is_distributed, naming_collective


T = TypeVar("T")


def _fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` holds FSDP2 (`fully_shard`) modules: its parameters are `DTensor` shards outside `forward`."""
    return bool(_fsdp2_modules(model))


def unsupported_sharding(model: torch.nn.Module) -> str | None:
    """What in `model` hides whole weights in a way the in-process init cannot take, in words; `None` for a whole
    model and for FSDP2.

    Refused: DeepSpeed ZeRO-3's partitioned parameters, parameters on the meta device (rank-0-only loading), FSDP1's
    `FullyShardedDataParallel` (flat shards), and `DTensor` parameters without FSDP2 (tensor parallelism).

    Example:

    ```python
    unsupported_sharding(fully_sharded_model)  # None: quailora_init takes it
    ```
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "DeepSpeed ZeRO-3 (the parameters are partitioned)"
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        return f"parameters on the meta device (e.g. {meta}; rank-0-only loading leaves the other processes none)"
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        return "FSDP1 (`FullyShardedDataParallel`: flat parameter shards); FSDP2 (`fully_shard`) is supported"
    if not is_fsdp2_sharded(model):
        sharded = next((name for name, p in model.named_parameters() if _is_dtensor(p)), None)
        if sharded is not None:
            return f"sharded DTensor parameters without FSDP2 (tensor parallelism; e.g. {sharded})"
    return None


def check_shardable(model: torch.nn.Module) -> None:
    """Under `torch.distributed`, refuse a model whose weights `quailora_init` cannot take (`unsupported_sharding`),
    naming `hf-quailora init`, before any work.

    Raises:
        ValueError: FSDP1, ZeRO-3, meta weights or tensor parallelism.

    Example:

    ```python
    check_shardable(model)  # passes for one process, DDP and FSDP2
    ```
    """
    setup = unsupported_sharding(model) if is_distributed() else None
    if setup is not None:
        raise ValueError(
            f"quailora_init cannot initialise a model under {setup}: it needs whole weights on every process, or "
            "FSDP2 shards. Initialise on one process with `hf-quailora init` (it writes the QuAILoRA start as a peft "
            "adapter folder) and start the sharded run from that folder; see docs/launchers.md."
        )


def run_on_every_process(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every process, then agree: a failure on any process raises on every process.

    One all-reduce of a failure flag after `fn` (so `fn` must not run collectives that another process could skip
    by failing first). Outside `torch.distributed` it simply runs `fn`.

    Args:
        fn (`Callable[[], T]`): the local work of this process.
        what (`str`): named in the error the other processes raise.

    Returns:
        What `fn` returned.

    Raises:
        Whatever `fn` raised, on its process; `RuntimeError` naming `what` on the others.

    Example:

    ```python
    plans = run_on_every_process(lambda: plan_layers(model), "planning the QuAILoRA init")
    ```
    """
    if not is_distributed():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # raised below, once every process has heard of it
        error = exc
    with naming_collective(f"the agreement after {what}"):
        failed = torch.tensor([float(error is not None)], device=_collective_device())
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        rank = torch.distributed.get_rank()
        raise RuntimeError(f"Process {rank}: {what} failed on another process; see its error.")
    return result


def solve_layer_everywhere(solve_layer: Callable, plan, *args):
    """`solve_layer(plan, *args, dequantize=...)` on every process of an FSDP2 model: `Q` gathered first (a
    collective, the same on every process), then the local solve, then agreement (`run_on_every_process`)."""
    from ..quantization import dequantize_weight

    with naming_collective(f"the gather of the quantized weight of {plan.name}"):
        pending = [dequantize_weight(plan.module.get_base_layer())]
    # handed over, not kept here: the solve frees Q once E = W − Q is formed (one layer's weights at a time)
    return run_on_every_process(lambda: solve_layer(plan, *args, dequantize=lambda layer: pending.pop()),
                                f"the QuAILoRA solve of {plan.name}")


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back into its sharded state: the parameters are then the `DTensor` shards (an unsharded
    module's parameters are plain tensors that its next all-gather would overwrite)."""
    for module in _fsdp2_modules(model):
        module.reshard()


@torch.no_grad()
def write_sharded(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole `value` into the `DTensor` parameter `param`, in place: this process's shard of process 0's
    `value` (a collective: every process calls it for the same parameters in the same order).

    `distribute_tensor` scatters from process 0 (`src_data_rank=0`, its default), so every shard comes from one
    solution even where solvers are not bitwise reproducible across devices: a sign flipped by a GPU's SVD on one
    process would otherwise pair process 0's rows of `B` with process 1's rows.

    Raises:
        ValueError: the shard does not have the shape of `param`'s local tensor (placements not made by FSDP2).
    """
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    value = value.to(device=local.device, dtype=param.dtype)
    with naming_collective("the scatter of process 0's QuAILoRA factors"):
        shard = distribute_tensor(value, param.device_mesh, param.placements).to_local()
    if shard.shape != local.shape:
        raise ValueError(
            f"A factor's shard has shape {tuple(shard.shape)}, its parameter's local tensor {tuple(local.shape)} "
            f"(placements {param.placements}); only FSDP2's own sharding is supported."
        )
    local.copy_(shard)


@torch.no_grad()
def write_factors(model: torch.nn.Module, results: list[tuple], adapter_name: str) -> None:
    """Step 4 of `quailora_init`: write each `(lora module, lora_B, lora_A)` in place, so that every process ends
    with process 0's factors.

    Whole factors are copied (`param.data.copy_()` keeps the Parameters the optimizer may already hold) and, under
    `torch.distributed`, broadcast from process 0, bit for bit; `DTensor` factors (FSDP2) receive their shard of
    process 0's factors (`write_sharded`), after every FSDP2 module is resharded.
    """
    reshard(model)
    whole = []
    for module, lora_B, lora_A in results:
        factors = (module.lora_B[adapter_name].weight, lora_B), (module.lora_A[adapter_name].weight, lora_A)
        for param, value in factors:
            if _is_dtensor(param):
                write_sharded(param, value)
            else:
                param.data.copy_(value)
                whole.append(param)
    if is_distributed() and whole:
        with naming_collective("the broadcast of process 0's QuAILoRA factors"):
            for param in whole:
                torch.distributed.broadcast(param.data, src=0)

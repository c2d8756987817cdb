"""Finish dtype casts that left a `DTensor` parameter's local shard behind, before FSDP2's first forward.

trl's `SFTTrainer` casts the LoRA factors of a quantized model to bf16 with `param.data = param.data.to(bf16)`.
On an FSDP2 (`fully_shard`) parameter that assignment changes only the `DTensor`'s outer dtype: its local shard
stays float32, so the gradients FSDP2 reduces come back in bf16 beside float32 shards, and the first fused AdamW
step fails ("expected scalar type Float but found BFloat16"). Casting the local shard as well, before FSDP2's lazy
initialisation (the first forward), gives the parameters the one dtype FSDP2 then reads for its all-gathers, as a
cast with `module.to()` would.

Example:

```python
trainer = SFTTrainer(model=fsdp2_qlora_model, ...)  # trl casts the factors' outer dtype only
finish_dtensor_casts(trainer.model)  # the local shards follow: bf16 factors, as on one process
```
"""

from __future__ import annotations

import logging

import torch


logger = logging.getLogger(__name__)


def _fsdp_param_groups(model: torch.nn.Module) -> list:
    """FSDP2's parameter groups that already ran their lazy initialisation (they read the dtypes there)."""
    groups = []
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if callable(state) else None
        if group is not None and getattr(group, "_reset_sharded_params", False):
            groups.append(group)
    return groups


def _reshard(model: torch.nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again. A forward before the Trainer (an evaluation, a check
    of the start) leaves the root's parameters gathered, as plain tensors (FSDP2 keeps them for the backward), and
    re-reading the shards below would then fail ("'Parameter' object has no attribute '_local_tensor'")."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # an older torch, without FSDP2 under this public name
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _drop_gather_buffers(fsdp_param) -> None:
    """A forward before the cast allocated the parameter's all-gather buffers in its old dtype, and FSDP2 reuses them:
    the bf16 shards were gathered into float32 buffers (a nan loss at the first step). Drop them; the next all-gather
    allocates them in the new dtype."""
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    if unsharded is not None and unsharded.dtype != fsdp_param.sharded_param.dtype:
        fsdp_param.all_gather_outputs = []
        del fsdp_param._unsharded_param


@torch.no_grad()
def finish_dtensor_casts(model: torch.nn.Module) -> list[str]:
    """Cast each `DTensor` parameter's local shard to the parameter's own dtype where the two differ.

    Args:
        model (`torch.nn.Module`): a model whose parameters may be FSDP2 `DTensor`s.

    Returns:
        `list[str]`: the names of the parameters whose local shard was cast (empty when every one agreed, and
        outside `torch.distributed`).

    Example:

    ```python
    assert finish_dtensor_casts(model) == []  # every local shard already had its parameter's dtype
    ```
    """
    if not torch.distributed.is_available():
        return []
    from torch.distributed.tensor import DTensor

    _reshard(model)
    cast = []
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and param._local_tensor.dtype != param.dtype:
            param._local_tensor = param._local_tensor.to(param.dtype)
            cast.append(name)
    if cast:
        logger.info("Cast the local shards of %d DTensor parameters to their own dtype (e.g. %s).", len(cast), cast[0])
        for group in _fsdp_param_groups(model):  # already initialised: re-read the shards and their dtypes
            for fsdp_param in group.fsdp_params:
                fsdp_param.reset_sharded_param()
                _drop_gather_buffers(fsdp_param)
            group._init_mp_dtypes()
    return cast

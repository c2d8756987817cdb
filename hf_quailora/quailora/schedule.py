"""The plan of QuAILoRA's calibration: which LoRA layers are calibrated together, how, and on which devices.

`plan_schedule` decides everything before any forward pass, from the config and the model, each thing once:

1. the devices: where the Gram matrices accumulate, and the device whose free memory counts (`gram_devices`);
2. the decoder blocks and each block's Gram bytes (`in_features² × bytes` per LoRA layer, an upper bound);
3. the limit: the memory budget the config parsed (`QuAILoRAConfig.memory_budget_bytes`), or for `"auto"` the
   free memory of that device; then one check that the largest block fits in it, with one message;
4. the groups of consecutive blocks (`memory.group_blocks`).

`quailora/streaming.py` executes a `Schedule`; `quailora/memory.py` holds the numbers (the budget parser, the free
memory, the formula).

Example:

```python
from hf_quailora.quailora.schedule import plan_schedule

schedule = plan_schedule(model, {"model.layers.0.self_attn.q_proj": 64, ...}, QuAILoRAConfig(streaming="passes"))
print(schedule.mode, len(schedule.groups), schedule.gram_device)
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .._dist_utils import is_distributed
from .memory import format_bytes, free_memory, group_blocks


logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Which layers are calibrated together, how, and where.

    Attributes:
        mode: `"replay"`, `"passes"` or `"off"` (one group of everything).
        groups: layer names per group, in the order the model runs them.
        blocks: the decoder blocks (replay and passes); `block_of[name]` is the block index of a layer.
        outside: layers in no block (calibrated by one whole-model pass after the blocks).
        gram_device: where the Gram matrices accumulate; `None`: on each layer's own device.
        memory_device: the device whose free memory counts for `memory_budget="auto"`.
        solve_device: where the solves run; `None`: on each layer's own device (`quailora/placement.py`).
    """

    mode: str
    groups: list[list[str]]
    blocks: list[torch.nn.Module] = field(default_factory=list)
    block_of: dict[str, int] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)
    gram_device: torch.device | None = None
    memory_device: torch.device | None = None
    solve_device: torch.device | None = None


def gram_devices(model: torch.nn.Module, config, placement=None) -> tuple[torch.device | None, torch.device]:
    """Where Gram matrices accumulate (`None`: each layer's device) and the device whose free memory counts; a
    `placement` (`quailora/placement.py`, the `"auto"` choice) decides over `config.gram_device`."""
    if (placement.gram_on_cpu if placement is not None else config.gram_device == "cpu"):
        return torch.device("cpu"), torch.device("cpu")
    return None, next(model.parameters()).device


def find_decoder_blocks(model: torch.nn.Module, layer_names: list[str]):
    """The `nn.ModuleList` holding the most of `layer_names` (the decoder blocks), or None.

    Returns:
        `(list_name, blocks, block_of)`: the list's name, its modules and layer name → block index.
    """
    best = None
    for name, module in model.named_modules():  # outer lists first: a tie keeps the outer one
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{name}."
        inside = {
            layer: int(layer[len(prefix):].split(".", 1)[0]) for layer in layer_names if layer.startswith(prefix)
        }
        if inside and (best is None or len(inside) > len(best[2])):
            best = (name, list(module), inside)
    return best


def _block_bytes(names_per_block: list[list[str]], in_features: Mapping[str, int], element_bytes: int) -> list[int]:
    """Upper bound of each block's Gram bytes: `in²` per LoRA layer (not subtracting shared inputs)."""
    return [sum(in_features[name] ** 2 * element_bytes for name in names) for names in names_per_block]


def _check_one_block_fits(sizes: list[int], block_names: list[str], limit: int, limit_name: str,
                          advice: list[str]) -> None:
    """The one check of the plan: the largest block's Gram matrices fit in `limit` (a budget or free memory)."""
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[largest] > limit:
        raise ValueError(
            f"QuAILoRA cannot stream even one block: {block_names[largest]} needs {format_bytes(sizes[largest])} "
            f"({sizes[largest]} bytes) of Gram matrices, more than {limit_name} ({format_bytes(limit)}). Use "
            f"{', '.join(advice)}, or fewer LoRA target modules."
        )


def _smallest_over_processes(value: int, device: torch.device) -> int:
    """The smallest `value` over processes, so that every process plans the same groups (the same collectives)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def _group_budget(config, sizes: list[int], block_names: list[str], memory_device: torch.device,
                  replay: bool) -> int | None:
    """Step 3: the budget that groups the blocks (`None`: one block per group), after the one check."""
    budget = config.memory_budget_bytes
    smaller_dtype = ["gram_dtype='float32' (half the bytes)"] if config.gram_dtype != "float32" else []
    if budget is not None:
        _check_one_block_fits(sizes, block_names, budget, "`memory_budget`",
                              ["a `memory_budget` of at least that", "'auto'", *smaller_dtype])
        return budget
    # "auto": one block's Gram matrices must fit in what the device has free
    free = _smallest_over_processes(free_memory(memory_device), memory_device)
    elsewhere = ["gram_device='cpu'"] if memory_device.type != "cpu" else []
    _check_one_block_fits(sizes, block_names, free, f"the free memory of {memory_device}",
                          ["free memory", *elsewhere, *smaller_dtype])
    return None if replay else max(free // 2, max(sizes))  # replay: one block at a time costs no extra compute


def plan_schedule(model: torch.nn.Module, in_features: Mapping[str, int], config, placement=None) -> Schedule:
    """Decide the mode, the devices and the groups from the config and the model, before any forward pass.

    Args:
        model (`torch.nn.Module`): the model whose LoRA layers are calibrated.
        in_features (`Mapping[str, int]`): the input width of each LoRA layer to calibrate, by name, in model order.
        config (`QuAILoRAConfig`): `streaming`, `memory_budget`, `gram_device` and `gram_dtype` are read.
        placement (`Placement`, *optional*): where the Gram matrices and the solves go (`choose_placement`);
            `None`: `config.gram_device` alone, the solves on each layer's device.

    Returns:
        `Schedule`.

    Raises:
        ValueError: one block's Gram matrices exceed the budget, or the free memory for `"auto"` (naming the block
            and its bytes), or replay was asked for a model whose LoRA layers lie in no list of blocks.
    """
    names = list(in_features)
    gram_device, memory_device = gram_devices(model, config, placement)  # 1.
    solve_device = placement.solve_device if placement is not None else None
    found = find_decoder_blocks(model, names) if config.streaming != "off" else None
    if found is None:
        if config.streaming == "replay":
            raise ValueError(
                "streaming='replay' needs the LoRA layers inside a list of decoder blocks (an nn.ModuleList); this "
                "model has none. Use streaming='passes' or 'auto'."
            )
        return Schedule("off", [names], gram_device=gram_device, memory_device=memory_device,
                        solve_device=solve_device)
    list_name, blocks, block_of = found  # 2.
    mode = "passes" if config.streaming == "passes" else "replay"
    per_block = [[name for name in names if block_of.get(name) == index] for index in range(len(blocks))]
    sizes = _block_bytes(per_block, in_features, torch.finfo(getattr(torch, config.gram_dtype)).bits // 8)
    block_names = [f"{list_name}.{index}" for index in range(len(blocks))]
    budget = _group_budget(config, sizes, block_names, memory_device, replay=mode == "replay")  # 3.
    used = [index for index in range(len(blocks)) if per_block[index]]  # 4.
    if budget is None:
        index_groups = [[index] for index in used]
    else:
        index_groups = [[used[i] for i in group] for group in group_blocks([sizes[i] for i in used], budget)]
    groups = [[name for index in group for name in per_block[index]] for group in index_groups]
    outside = [name for name in names if name not in block_of]
    logger.info(
        "QuAILoRA streams %d blocks of %s by %s in %d groups (at most %s of Gram matrices per block)%s.",
        len(blocks), list_name, mode, len(groups), format_bytes(max(sizes)),
        f", plus one pass for {len(outside)} layers outside the blocks" if outside else "",
    )
    return Schedule(mode, groups, blocks, block_of, outside, gram_device, memory_device, solve_device)

"""Streamed calibration: the decoder blocks a group at a time, so that only one group's Gram matrices are alive.

Two ways, chosen by `QuAILoRAConfig.streaming`:

- *replay* (as GPTQ implementations do): one recording pass stores, per calibration batch, the hidden states
  entering the first block and the forward arguments of every block (attention masks and position embeddings
  differ per block in models with sliding-window layers, e.g. Gemma); the blocks themselves are skipped in that
  pass. Then each block runs alone on the cached hidden states, with hooks on its LoRA layers, and its outputs
  replace the cache as the next block's inputs: one forward's worth of compute in all.
- *passes*: the whole model runs once per group, with hooks on that group's layers only. Any architecture.

Every LoRA layer sees exactly the inputs it sees in one whole-model pass (quantized model, adapters disabled,
eval mode), so the factors equal those of the all-at-once design up to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .calibration import GramCollector, GramStatistics, collect_gram_matrices, finish_statistics
from .memory import format_bytes, free_memory, group_blocks, parse_memory_budget


logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Which layers are calibrated together, and how.

    Attributes:
        mode: `"replay"`, `"passes"` or `"off"` (one group of everything).
        groups: layer names per group, in the order the model runs them.
        blocks: the decoder blocks (replay and passes); `block_of[name]` is the block index of a layer.
        outside: layers in no block (calibrated by one whole-model pass after the blocks).
    """

    mode: str
    groups: list[list[str]]
    blocks: list[torch.nn.Module] = field(default_factory=list)
    block_of: dict[str, int] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)


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


def plan_schedule(model, in_features: Mapping[str, int], config, gram_device: torch.device) -> Schedule:
    """Decide the mode and the groups from the config and the model, before any forward pass.

    Raises:
        ValueError: the budget is smaller than one block (naming the block and the minimum), or replay was asked
            for a model whose LoRA layers lie in no list of blocks.
    """
    names = list(in_features)
    budget = parse_memory_budget(config.memory_budget)
    found = find_decoder_blocks(model, names) if config.streaming != "off" else None
    if found is None:
        if config.streaming == "replay":
            raise ValueError(
                "streaming='replay' needs the LoRA layers inside a list of decoder blocks (an nn.ModuleList); this "
                "model has none. Use streaming='passes' or 'auto'."
            )
        return Schedule("off", [names])
    list_name, blocks, block_of = found
    mode = "passes" if config.streaming == "passes" else "replay"
    per_block = [[name for name in names if block_of.get(name) == index] for index in range(len(blocks))]
    element_bytes = torch.finfo(getattr(torch, config.gram_dtype)).bits // 8
    sizes = _block_bytes(per_block, in_features, element_bytes)
    block_names = [f"{list_name}.{index}" for index in range(len(blocks))]
    if budget is None:  # "auto": one block's Gram matrices must fit in what the Gram device has free
        free = _smallest_over_processes(free_memory(gram_device), gram_device)
        _check_one_block_fits(sizes, block_names, free, gram_device, element_bytes)
        if mode == "passes":
            budget = max(free // 2, max(sizes))
    if budget is None:  # replay: one block at a time costs no extra compute
        index_groups = [[index] for index in range(len(blocks)) if per_block[index]]
    else:
        used = [index for index in range(len(blocks)) if per_block[index]]
        index_groups = [[used[i] for i in group] for group in
                        group_blocks([sizes[i] for i in used], budget, [block_names[i] for i in used])]
    groups = [[name for index in group for name in per_block[index]] for group in index_groups]
    outside = [name for name in names if name not in block_of]
    logger.info(
        "QuAILoRA streams %d blocks of %s by %s in %d groups (at most %s of Gram matrices per block)%s.",
        len(blocks), list_name, mode, len(groups), format_bytes(max(sizes)),
        f", plus one pass for {len(outside)} layers outside the blocks" if outside else "",
    )
    return Schedule(mode, groups, blocks, block_of, outside)


def _check_one_block_fits(sizes: list[int], block_names: list[str], free: int, gram_device: torch.device,
                          element_bytes: int) -> None:
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[largest] > free:
        advice = ["free memory"] + (["gram_device='cpu'"] if gram_device.type != "cpu" else [])
        advice += ["gram_dtype='float32' (half the bytes)"] if element_bytes > 4 else []
        raise ValueError(
            f"QuAILoRA cannot stream even one block: {block_names[largest]} needs {format_bytes(sizes[largest])} of "
            f"Gram matrices and {gram_device} has {format_bytes(free)} free. Use {', '.join(advice)}, or fewer "
            "LoRA target modules."
        )


def _smallest_over_processes(value: int, device: torch.device) -> int:
    """The smallest `value` over processes, so that every process plans the same groups (the same collectives)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


class _StopForward(Exception):
    """Ends the recording pass after the last block (the head's compute is not needed)."""


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


class _Recorder:
    """Replaces every block's `forward` for one pass: records its arguments and passes the hidden states on."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.blocks = blocks
        self.calls: list[tuple] = []
        self.hidden: torch.Tensor | None = None

    def _make_forward(self, index: int) -> Callable:
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.calls.append((args[1:], kwargs))
            if index == 0:
                self.hidden = hidden
            if index == len(self.blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    def __enter__(self):
        self._saved = [block.__dict__.get("forward") for block in self.blocks]  # accelerate may wrap forward
        for index, block in enumerate(self.blocks):
            block.forward = self._make_forward(index)
        return self

    def __exit__(self, *exc):
        for block, saved in zip(self.blocks, self._saved):
            if saved is None:
                del block.forward
            else:
                block.forward = saved


@torch.no_grad()
def record_block_inputs(model, blocks: list[torch.nn.Module], batches: list[dict]) -> tuple[list, list]:
    """Per batch, the hidden states entering `blocks[0]` and every block's other forward arguments.

    Raises:
        ValueError: the blocks are not called one after another, once each (replay cannot reproduce this model;
            use `streaming="passes"`).
    """
    device = next(model.parameters()).device
    hidden_states, arguments = [], []
    for batch in batches:
        with _Recorder(blocks) as recorder:
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
            except _StopForward:
                pass
        if len(recorder.calls) != len(blocks) or recorder.hidden is None:
            raise ValueError(
                f"The model called its {len(blocks)} decoder blocks {len(recorder.calls)} times in one forward, not "
                "once each in order: block replay cannot reproduce it. Use QuAILoRAConfig(streaming='passes')."
            )
        hidden_states.append(recorder.hidden)
        arguments.append(recorder.calls)
    return hidden_states, arguments


def _block_device(block: torch.nn.Module) -> torch.device:
    return next(block.parameters()).device


@torch.no_grad()
def _replay_block(block, index: int, hidden_states: list, arguments: list, masks: list, collector) -> None:
    """Run one block on every cached batch, with its recorded arguments; its outputs replace the cache."""
    device = _block_device(block)
    for batch, (args, kwargs) in enumerate(arguments_of(arguments, index)):
        collector.start_batch(masks[batch])
        output = block(hidden_states[batch].to(device), *_to(args, device), **_to(kwargs, device))
        hidden_states[batch] = output[0] if isinstance(output, tuple) else output


def arguments_of(arguments: list, index: int) -> Iterator[tuple]:
    """The recorded `(args, kwargs)` of block `index`, batch by batch."""
    return (calls[index] for calls in arguments)


def stream_statistics(model, batches: list[dict], modules: Mapping[str, torch.nn.Module], schedule: Schedule,
                      dtype: torch.dtype, gram_device: torch.device | None,
                      show_progress: bool) -> Iterator[GramStatistics]:
    """Yield the Gram statistics of each group of `schedule` in turn (summed over processes).

    Drop each group's statistics before asking for the next: only then is one group alive at a time.
    """
    if schedule.mode == "passes" or schedule.mode == "off":
        one_pass = len(schedule.groups) < 2  # a bar over batches; else a bar over groups
        for group in tqdm(schedule.groups, desc="QuAILoRA passes", disable=not show_progress or one_pass, unit="group"):
            yield collect_gram_matrices(model, batches, {name: modules[name] for name in group}, dtype,
                                        show_progress=show_progress and one_pass, device=gram_device)
        if schedule.outside and schedule.mode == "passes":
            yield collect_gram_matrices(model, batches, {name: modules[name] for name in schedule.outside}, dtype,
                                        show_progress=False, device=gram_device)
        return
    yield from _replay_groups(model, batches, modules, schedule, dtype, gram_device, show_progress)
    if schedule.outside:  # e.g. an adapted lm_head: one more whole-model pass, for those layers only
        yield collect_gram_matrices(model, batches, {name: modules[name] for name in schedule.outside}, dtype,
                                    show_progress=False, device=gram_device)


def _replay_groups(model, batches, modules, schedule: Schedule, dtype, gram_device, show_progress):
    hidden_states, arguments = record_block_inputs(model, schedule.blocks, batches)
    masks = [batch["attention_mask"] for batch in batches]
    num_tokens = sum(int(mask.sum()) for mask in masks)
    model_device = next(model.parameters()).device
    next_block = 0
    progress = tqdm(total=len(schedule.blocks), desc="QuAILoRA blocks", disable=not show_progress, unit="block")
    for group in schedule.groups:
        last = max(schedule.block_of[name] for name in group)
        group_modules = {name: modules[name] for name in group}
        collector = GramCollector(group_modules, dtype, gram_device)
        with collector:
            while next_block <= last:  # blocks without LoRA layers still carry the hidden states on
                _replay_block(schedule.blocks[next_block], next_block, hidden_states, arguments, masks, collector)
                next_block += 1
                progress.update(1)
        stats = finish_statistics(collector.stats, group_modules, num_tokens, model_device)
        del collector
        yield stats
        del stats
    progress.close()

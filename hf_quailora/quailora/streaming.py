"""Streamed calibration: the decoder blocks a group at a time, so that only one group's Gram matrices are alive.

This module executes a `Schedule` that `quailora/schedule.py` planned (the groups, the mode, the Gram device); it
decides nothing. Two ways, chosen by `QuAILoRAConfig.streaming`:

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

import torch
from tqdm.auto import tqdm

from .calibration import GramCollector, GramStatistics, collect_gram_matrices, finish_statistics, gram_mask
from .schedule import Schedule


logger = logging.getLogger(__name__)


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
def record_block_inputs(model, blocks: list[torch.nn.Module], batches: list[dict],
                        cache_device: torch.device | None = None) -> tuple[list, list]:
    """Per batch, the hidden states entering `blocks[0]` (on `cache_device`; `None`: where they are) and every
    block's other forward arguments.

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
        hidden_states.append(recorder.hidden.to(cache_device or recorder.hidden.device))
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
        cache = hidden_states[batch].device  # the cache stays where it is (the CPU with gram_device="cpu")
        output = block(hidden_states[batch].to(device), *_to(args, device), **_to(kwargs, device))
        hidden_states[batch] = (output[0] if isinstance(output, tuple) else output).to(cache)


def arguments_of(arguments: list, index: int) -> Iterator[tuple]:
    """The recorded `(args, kwargs)` of block `index`, batch by batch."""
    return (calls[index] for calls in arguments)


def stream_statistics(model, batches: list[dict], modules: Mapping[str, torch.nn.Module], schedule: Schedule,
                      dtype: torch.dtype, show_progress: bool) -> Iterator[GramStatistics]:
    """Yield the Gram statistics of each group of `schedule` in turn (summed over processes), accumulated in `dtype`
    on `schedule.gram_device`.

    Drop each group's statistics before asking for the next: only then is one group alive at a time.
    """
    gram_device = schedule.gram_device
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
    # with gram_device="cpu" the hidden-state cache waits on the CPU too: the GPU holds one batch of it
    hidden_states, arguments = record_block_inputs(model, schedule.blocks, batches, gram_device)
    masks = [gram_mask(batch) for batch in batches]  # zero for padding batches
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

"""Where QuAILoRA's solves run, and their overlap with the next group's calibration (`QuAILoRAConfig.solve_device`).

The solve's workspace (up to two in×in matrices in the solve dtype, at the widest layer) is the largest term of the
init's peak from ~32B parameters on (docs/memory.md). Solving on the CPU takes it off the GPU:

- `"model"`: each layer is solved on its own device (the original behaviour);
- `"cpu"`: W, Q, E, the Gram matrix and the solve are on the CPU; the factors go back to the adapter's device. A
  group's solves then run in a background thread while the next group is calibrated (torch releases the GIL in its
  kernels), and the group's Gram matrices are moved to the CPU first, so the GPU holds one group's at a time;
- `"auto"` (the default), with `gram_device="auto"` (the default): on a CPU model, everything where the layers are;
  on a GPU, the cheapest of four placements (`PLACEMENTS`: all on the GPU; the solves on the CPU; the Gram matrices
  on the CPU; both) whose estimated init peak (`quailora/memory.py`) stays under the free memory and under the extra
  memory of a QLoRA fine-tuning step (`FINETUNE_TARGET`, batch 1 × 2048, `quailora/finetune_memory.py`): the init
  then never needs a larger GPU than the training it starts. One INFO line says which and why
  (`choose_placement`). A setting other than `"auto"` fixes its half.

When the Gram matrices accumulate on another device than the activations (`gram_device="cpu"` under a GPU model), each
batch's `XᵀX` is formed by blocks of `GRAM_BLOCK_COLUMNS` (512) columns, each moved as it is made: the GPU then holds
one `in × 512` block, not the `in × in` product (3.1 GiB in float32 at in = 28672, Llama-3.1-70B's down projection).

The factors are the same wherever the solve runs (same dtype, same operations; the report's per-group timings show the
overlap in the log).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from .finetune_memory import OPTIMIZER_BYTES, estimate_finetune_memory
from .memory import (
    GRAM_BLOCK_COLUMNS,
    MASK_CHUNK_ROWS,
    InitMemory,
    _solve_workspace,
    estimate_init_memory,
    format_bytes,
    free_memory,
)
from .schedule import _smallest_over_processes


logger = logging.getLogger(__name__)


def float_rows(rows: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = MASK_CHUNK_ROWS) -> torch.Tensor:
    """`rows[mask]` in at least float32 (`mask=None`: every row), the same values as `rows[mask].float()`, but
    masked and upcast `chunk` rows at a time: no whole copy of the rows in a 16-bit activations' dtype is made
    beside the float32 one (docs/memory.md, the calibration step)."""
    dtype = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    if mask is None:
        return rows.to(dtype)
    mask = mask.to(rows.device)
    if dtype == rows.dtype:
        return rows[mask]
    keep = mask.nonzero().squeeze(1)
    out = torch.empty(keep.numel(), rows.shape[1], dtype=dtype, device=rows.device)
    for start in range(0, keep.numel(), chunk):
        out[start:start + chunk] = rows.index_select(0, keep[start:start + chunk])
    return out


def add_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """`total += rowsᵀ rows`, on `rows`' device (`total` there too); `add_` casts element by element, so no copy of
    the product in `total`'s dtype is made."""
    total.add_(rows.T @ rows)


def add_gram_by_blocks(total: torch.Tensor, rows: torch.Tensor, columns: int = GRAM_BLOCK_COLUMNS) -> None:
    """`total += rowsᵀ rows` with `total` on another device: by blocks of `columns` columns, each moved as it is made."""
    for start in range(0, rows.shape[1], columns):
        block = rows.T @ rows[:, start:start + columns]
        total[:, start:start + block.shape[1]].add_(block.to(total.device))


# The fine-tuning step `"auto"` aims under when nothing else is known: QLoRA's, batch 1 × 2048 tokens, paged 8-bit
# AdamW, gradient checkpointing (`quailora/finetune_memory.py`). A larger training step only leaves more room.
FINETUNE_TARGET = {"batch_size": 1, "max_length": 2048, "optimizer": "paged_adamw_8bit"}
_TARGET = contextvars.ContextVar("quailora_finetune_target", default=None)


@contextlib.contextmanager
def aim_at_training(args):
    """Inside, `"auto"` aims under the training step that `args` configure (a transformers `TrainingArguments`:
    `per_device_train_batch_size` × `max_length` tokens, `optim`) instead of `FINETUNE_TARGET`; what `args` lack
    comes from `FINETUNE_TARGET`, an optimizer the formula does not know counts as paged 8-bit AdamW (the smallest
    states). `QuAILoRAInitCallback` wraps its init in it. With sequences shorter than `max_length` (no packing)
    the real step is smaller than this target.

    Example:

    ```python
    with aim_at_training(SFTConfig(per_device_train_batch_size=4, max_length=1024)):
        quailora_init(model, texts, tokenizer=tokenizer)
    ```
    """
    optimizer = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None)))
    target = {
        "batch_size": getattr(args, "per_device_train_batch_size", None) or FINETUNE_TARGET["batch_size"],
        "max_length": getattr(args, "max_length", None) or FINETUNE_TARGET["max_length"],
        "optimizer": optimizer if optimizer in OPTIMIZER_BYTES else FINETUNE_TARGET["optimizer"],
    }
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)


# (solve on the CPU, Gram matrices on the CPU), cheapest first: each step moves more work off the GPU
PLACEMENTS = ((False, False), (True, False), (False, True), (True, True))


@dataclass
class Placement:
    """Where the solves and the Gram matrices go, and why.

    Attributes:
        solve_on_cpu / gram_on_cpu (`bool`): `solve_device="cpu"` / `gram_device="cpu"` in effect.
        peak (`int`, *optional*): the init's estimated peak on the model's device beside the model (bytes).
        limit (`int`, *optional*): what it had to stay under: the free memory, and the fine-tuning step's own
            extra memory when known (bytes).
        fits (`bool`): `peak <= limit` (`False`: no placement fits; the smallest was taken).
    """

    solve_on_cpu: bool
    gram_on_cpu: bool
    peak: int | None = None
    limit: int | None = None
    fits: bool = True

    @property
    def solve_device(self) -> torch.device | None:
        """The device of the solves (`None`: each layer's own)."""
        return torch.device("cpu") if self.solve_on_cpu else None


def decide_placement(init: InitMemory, free: int, target: int | None, solve_device: str = "auto",
                     gram_device: str = "auto") -> Placement:
    """The cheapest placement (`PLACEMENTS` order) whose estimated init peak stays under `free` and `target`.

    Pure: no device is queried. Settings other than `"auto"` fix their half of the placement.

    Args:
        init (`InitMemory`): the formula's terms for this model (`quailora/memory.py`).
        free (`int`): free bytes on the model's device.
        target (`int`, *optional*): the fine-tuning step's extra memory beside the loaded model and adapter
            (`FinetuneMemory.training_extra`); `None`: the free memory alone.
        solve_device / gram_device (`str`): `QuAILoRAConfig`'s settings.

    Returns:
        `Placement`; when none fits, the one with the smallest peak, with `fits=False`.

    Example:

    ```python
    decide_placement(init, free=80 * 2**30, target=4 * 2**30)  # e.g. Placement(solve_on_cpu=True, ...)
    ```
    """
    allowed = {"auto": (False, True), "model": (False,), "cpu": (True,)}
    options = [(solve, gram) for solve, gram in PLACEMENTS
               if solve in allowed[solve_device] and gram in allowed[gram_device]]
    limit = free if target is None else min(free, target)
    for solve, gram in options:
        if init.placed_peak(solve, gram) <= limit:
            return Placement(solve, gram, init.placed_peak(solve, gram), limit)
    solve, gram = min(options, key=lambda option: init.placed_peak(*option))
    return Placement(solve, gram, init.placed_peak(solve, gram), limit, fits=False)


def estimate_for_model(model: torch.nn.Module, config, layers: list[tuple[int, int, int]]):
    """The init's terms for `model` and `config` (`InitMemory`), and the fine-tuning target (`FINETUNE_TARGET`'s
    `training_extra`, or `None` when the model's config is not Llama-shaped: then only the solve and one block's
    Gram matrices are counted, against the free memory, as before).

    `layers` are the `(out, in, rank)` of the LoRA layers to solve: the workspace and the pending factors are theirs.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    activation = 2 if getattr(base, "dtype", torch.float32) in (torch.bfloat16, torch.float16) else 4
    gram, solve = (torch.finfo(getattr(torch, name)).bits // 8 for name in (config.gram_dtype, config.solve_dtype))
    rank = max(rank for _, _, rank in layers)
    exact = {"solve_workspace": max(_solve_workspace(out, inp) for out, inp, _ in layers) * solve,
             "pending_factors": sum(rank * (out + inp) for out, inp, rank in layers) * 4}
    try:
        init = estimate_init_memory(base.config, config.calibration_samples or 128, config.calibration_length,
                                    config.calibration_batch_size, gram, solve, activation, rank)
        target = estimate_finetune_memory(base.config, rank=rank, activation_bytes=activation,
                                          **(_TARGET.get() or FINETUNE_TARGET))
        return replace(init, **exact), target.training_extra
    except (AttributeError, TypeError, ValueError):  # not Llama-shaped: what the solve needs, against free memory
        widest = max(inp for _, inp, _ in layers)
        return InitMemory(0, 0, 0, 4 * widest**2 * gram, hidden_state_cache=0, calibration_step=0,
                          layer_gram=widest**2 * gram, **exact), None


def choose_placement(config, model: torch.nn.Module, layers: list[tuple[int, int, int]]) -> Placement:
    """Where the solves and the Gram matrices go, from `config.solve_device` / `config.gram_device`; `"auto"` takes
    the cheapest placement whose estimated peak stays under the device's free memory and the QLoRA fine-tuning
    step's (`FINETUNE_TARGET`), and logs its choice in one INFO line. On a CPU model `"auto"` keeps everything where
    the layers are.

    Args:
        config (`QuAILoRAConfig`): `solve_device`, `gram_device`, the calibration sizes and dtypes are read.
        model (`torch.nn.Module`): its first parameter's device is the one whose free memory counts.
        layers (`list[tuple[int, int, int]]`): `(out, in, rank)` of every LoRA layer to solve.
    """
    fixed = Placement(config.solve_device == "cpu", config.gram_device == "cpu")
    device = next(model.parameters()).device
    if device.type == "cpu" or not layers or "auto" not in (config.solve_device, config.gram_device):
        return fixed
    init, target = estimate_for_model(model, config, layers)
    free = _smallest_over_processes(free_memory(device), device)  # every process decides the same
    choice = decide_placement(init, free, target, config.solve_device, config.gram_device)
    where, aim = {False: str(device), True: "the CPU"}, _TARGET.get() or FINETUNE_TARGET
    logger.info(
        "QuAILoRA solves on %s, Gram matrices on %s: the init's peak is about %s beside the model, %s %s (%s free on "
        "%s%s; all on %s: %s).", where[choice.solve_on_cpu], where[choice.gram_on_cpu], format_bytes(choice.peak),
        "under" if choice.fits else "over, the smallest placement, of", format_bytes(choice.limit), format_bytes(free),
        device, "" if target is None else f", a QLoRA step at batch {aim['batch_size']} × {aim['max_length']} adds "
        f"{format_bytes(target)}", device, format_bytes(init.placed_peak()),
    )
    return choice


def _to_cpu(stats):
    """A group's statistics moved to the CPU (where it is solved), so that the model's device holds one group's."""
    if not hasattr(stats, "matrices"):
        return stats
    stats.matrices = {name: matrix.to("cpu") for name, matrix in stats.matrices.items()}
    return stats


def solve_groups(groups, solve_group, overlap: bool):
    """Run `solve_group(stats, group)` for each `(stats, group)` of the iterator `groups`, in order; with `overlap`,
    in one background thread while the iterator calibrates the next group (at most one group waits).

    Yields `(group index, solve_group's result, seconds)`, in order; logs each group's calibration and solve spans
    (seconds since the start; at INFO with `overlap`, so that the overlap shows in the log, else at DEBUG).
    """
    start = time.perf_counter()

    def timed(index, stats, group, calibrated):
        begun = time.perf_counter()
        result = solve_group(stats, group)
        ended = time.perf_counter()
        # INFO when the solves overlap calibration (the log shows it), DEBUG otherwise (one line per block is noise)
        logger.log(logging.INFO if overlap else logging.DEBUG, "QuAILoRA group %d: calibrated %.2f-%.2f s, solved "
                   "%.2f-%.2f s", index, calibrated[0] - start, calibrated[1] - start, begun - start, ended - start)
        return index, result, ended - begun

    if not overlap:
        before = time.perf_counter()
        for index, (stats, group) in enumerate(groups):
            yield timed(index, stats, group, (before, time.perf_counter()))
            del stats
            before = time.perf_counter()
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quailora-solve") as pool:
        waiting, before = None, time.perf_counter()
        for index, (stats, group) in enumerate(groups):
            calibrated = (before, time.perf_counter())
            if waiting is not None:
                yield waiting.result()  # the previous group, solved while this one was calibrated
            waiting = pool.submit(timed, index, _to_cpu(stats), group, calibrated)
            del stats
            before = time.perf_counter()
        if waiting is not None:
            yield waiting.result()

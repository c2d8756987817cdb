"""Where QuAILoRA's solves run, and their overlap with the next group's calibration (`QuAILoRAConfig.solve_device`).

The solve's workspace (up to two in×in matrices in the solve dtype, at the widest layer) is the largest term of the
init's peak from ~32B parameters on (docs/memory.md). Solving on the CPU takes it off the GPU:

- `"model"`: each layer is solved on its own device (the original behaviour);
- `"cpu"`: W, Q, E, the Gram matrix and the solve are on the CPU; the factors go back to the adapter's device. A
  group's solves then run in a background thread while the next group is calibrated (torch releases the GIL in its
  kernels), and the group's Gram matrices are moved to the CPU first, so the GPU holds one group's at a time;
- `"auto"` (the default): `"model"` when the model is on the CPU or when the largest layer's workspace and the
  largest block's Gram bytes fit in the free memory of the model's device, else `"cpu"`; the log says which.

When the Gram matrices accumulate on another device than the activations (`gram_device="cpu"` under a GPU model), each
batch's `XᵀX` is formed by blocks of `GRAM_BLOCK_COLUMNS` columns, each moved as it is made: the GPU then holds one
`in × 2048` block, not the `in × in` product (3.1 GiB in float32 at in = 28672, Llama-3.1-70B's down projection).

The factors are the same wherever the solve runs (same dtype, same operations; the report's per-group timings show the
overlap in the log).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .memory import _solve_workspace, format_bytes, free_memory


logger = logging.getLogger(__name__)

GRAM_BLOCK_COLUMNS = 2048


def add_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """`total += rowsᵀ rows`, on `rows`' device (`total` there too); `add_` casts element by element, so no copy of
    the product in `total`'s dtype is made."""
    total.add_(rows.T @ rows)


def add_gram_by_blocks(total: torch.Tensor, rows: torch.Tensor, columns: int = GRAM_BLOCK_COLUMNS) -> None:
    """`total += rowsᵀ rows` with `total` on another device: by blocks of `columns` columns, each moved as it is made."""
    for start in range(0, rows.shape[1], columns):
        block = rows.T @ rows[:, start:start + columns]
        total[:, start:start + block.shape[1]].add_(block.to(total.device))


def choose_solve_device(config, model: torch.nn.Module, shapes: list[tuple[int, int]],
                        gram_bytes: int) -> torch.device | None:
    """The device of the solves (`None`: each layer's own), from `config.solve_device`; `"auto"` logs its choice.

    Args:
        config (`QuAILoRAConfig`): `solve_device` and `solve_dtype` are read.
        model (`torch.nn.Module`): its first parameter's device is the one whose free memory counts.
        shapes (`list[tuple[int, int]]`): `(out, in)` of every layer to solve.
        gram_bytes (`int`): the largest group's Gram bytes, alive beside the solve on the model's device.
    """
    if config.solve_device == "cpu":
        return torch.device("cpu")
    device = next(model.parameters()).device
    if config.solve_device == "model" or device.type == "cpu" or not shapes:
        return None
    element = torch.finfo(getattr(torch, config.solve_dtype)).bits // 8
    need = max(_solve_workspace(out, inp) for out, inp in shapes) * element + gram_bytes
    free = free_memory(device)
    where = None if need <= free else torch.device("cpu")
    logger.info("QuAILoRA solves on %s: the largest solve needs %s beside the Gram matrices, %s free on %s.",
                device if where is None else "the CPU (overlapped with calibration)", format_bytes(need),
                format_bytes(free), device)
    return where


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

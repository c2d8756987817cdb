"""lm-eval's options and results without lm-eval itself: the checks that run before any model loads, and tidy rows.

`lm_eval_bridge` re-exports these names; they live here so that checking an option never imports lm-eval.
"""

from __future__ import annotations

from pathlib import Path

from .._io_utils import check_not_a_file
from ..dynamic_rank.spec import check_integer


RESULT_FILES = ("results.json", "results.md", "results.png")


def results_to_rows(results: dict, model_label: str, rank: int | None) -> list[dict]:
    """lm-eval's `results["results"]` as tidy rows `{model, rank, task, metric, value, stderr}`."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                "model": model_label,
                "rank": rank,
                "task": task,
                "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            })
    return rows


def check_output_dir(output_dir: str | None, overwrite: bool) -> None:
    """Raise unless results may be written into `output_dir`: not a file, and no earlier results unless
    `overwrite` (other files in the folder are left alone)."""
    if output_dir is None:
        return
    check_not_a_file(output_dir)
    existing = [f for f in RESULT_FILES if (Path(output_dir) / f).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{output_dir} already holds results ({', '.join(existing)}); choose another folder or pass "
            "overwrite=True (`--overwrite`)."
        )


def check_lm_eval_options(limit=None, batch_size=8, max_length=None, num_fewshot=None) -> None:
    """Raise a `ValueError` naming the option unless lm-eval can run with it; called before any model loads.

    `limit`: `None`, a positive number of documents or a fraction in (0, 1); `batch_size`: a positive integer
    or lm-eval's `"auto"`/`"auto:N"`; `max_length`: `None` or a positive integer; `num_fewshot`: `None` or
    an integer ≥ 0.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
                              or limit == float("inf")):
        raise ValueError(
            f"`limit` must be a positive number of documents per task (or a fraction below 1); got {limit!r}. "
            "Leave it unset to use every document."
        )
    if not (isinstance(batch_size, str) and batch_size.startswith("auto")):
        check_integer("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1 (or 'auto'); got {batch_size}.")
    if max_length is not None:
        check_integer("max_length", max_length)
        if max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 tokens (unset: the model's own); got {max_length}.")
    if num_fewshot is not None:
        check_integer("num_fewshot", num_fewshot)
        if num_fewshot < 0:
            raise ValueError(f"`num_fewshot` must be 0 or more; got {num_fewshot}.")

"""Finished arms on disk: one JSON per (model, rank, seed, arm), written atomically (`bench._common.write_json`),
so a run resumes per arm."""

from __future__ import annotations

import glob
import json
import os

from .arms import ARMS, RESUME_KEYS, CompareScriptArguments, base_arm


def model_slug(model: str) -> str:
    """A folder name for `model` (its last path component, `/` and spaces replaced)."""
    return os.path.basename(model.rstrip("/")).replace(" ", "_") or "model"


def arm_path(output_dir: str, model: str, rank: int, seed: int, arm: str) -> str:
    """`output_dir/runs/<model>/r<rank>/seed<seed>/<arm>.json`."""
    return os.path.join(output_dir, "runs", model_slug(model), f"r{rank}", f"seed{seed}", f"{arm}.json")


def resume_settings(args: CompareScriptArguments) -> dict:
    """The settings a stored arm must share with this run to be reused (`RESUME_KEYS`)."""
    return {key: getattr(args, key) for key in RESUME_KEYS}


def start_path(output_dir: str, model: str, rank: int, arm: str) -> str | None:
    """Where the evaluations at step 0 of `arm` are shared across seeds, None for the dynamic arm: with B = 0 the
    start is the base model whatever the seed and rank; an SVD or QuAILoRA start overwrites the random A, so it
    depends on the rank only."""
    quantization, solver, dynamic = ARMS[base_arm(arm)]
    if dynamic:
        return None
    arm = base_arm(arm)  # the start does not depend on the learning rate: quailora@lr<scale> shares quailora's
    name = f"{arm}.json" if solver is None else f"{arm}-r{rank}.json"
    return os.path.join(output_dir, "runs", model_slug(model), "start", name)


def load_finished(output_dir: str) -> list[dict]:
    """Every finished arm under `output_dir/runs`, sorted by model, rank, seed and path."""
    records = []
    for path in sorted(glob.glob(os.path.join(output_dir, "runs", "*", "r*", "seed*", "*.json"))):
        with open(path) as handle:
            record = json.load(handle)
        record["path"] = path
        records.append(record)
    return sorted(records, key=lambda r: (r["model"], r["rank"], r["seed"], r["path"]))


def check_compatible(records: list[dict], settings: dict) -> None:
    """Raise ValueError when a stored arm was run with other settings than `settings` (it must not be mixed in)."""
    for record in records:
        differing = {key: (record["settings"].get(key), value) for key, value in settings.items()
                     if record["settings"].get(key) != value}
        if differing:
            described = ", ".join(f"{key}: stored {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise ValueError(
                f"{record['path']} was run with other settings ({described}); use another `--output_dir`, or the "
                "stored settings to resume it."
            )

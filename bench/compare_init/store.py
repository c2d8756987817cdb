"""Finished arms on disk: one JSON per (model, rank, seed, arm), written atomically (`bench._common.write_json`),
so a run resumes per arm."""

from __future__ import annotations

import glob
import json
import os

from .arms import ARMS, CALIBRATION_KEYS, RESUME_KEYS, CompareScriptArguments, base_arm


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


def calibrates(arm: str) -> bool:
    """Whether `arm` (a run's arm name) calibrates: only its result depends on `CALIBRATION_KEYS`."""
    return ARMS[base_arm(arm)][1] == "closed_form"


def reference_settings(records: list[dict]) -> dict:
    """The settings stored arms are summarised under: those of the first arm that calibrates (else the first arm),
    so a folder whose QLoRA and int8 arms came from a run with another calibration source names the source of its
    QuAILoRA arms."""
    return next((r for r in records if calibrates(r["arm"])), records[0])["settings"]


def check_compatible(records: list[dict], settings: dict) -> None:
    """Raise ValueError when a stored arm was run with other settings than `settings` (it must not be mixed in).

    An arm that does not calibrate (QLoRA, int8, SVD: `calibrates`) is not checked on `CALIBRATION_KEYS`: its run is
    the same whatever the calibration text, so one set of those arms serves every calibration source."""
    for record in records:
        ignored = () if calibrates(record["arm"]) else CALIBRATION_KEYS
        differing = {key: (record["settings"].get(key), value) for key, value in settings.items()
                     if key not in ignored and record["settings"].get(key) != value}
        if differing:
            described = ", ".join(f"{key}: stored {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise ValueError(
                f"{record['path']} was run with other settings ({described}); use another `--output_dir`, or the "
                "stored settings to resume it."
            )

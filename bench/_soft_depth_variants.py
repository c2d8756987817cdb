"""bench/bench_soft_depth.py's variants: `--arms` (run only some arms), `--soft-exit-weights` (the SoFT arm's
exit weights) and `--baseline` (the arms a run left out, taken from an earlier run).

A SoFT variant (e.g. `--arms soft --soft-exit-weights 0.1,0.1,0.1,1`) is compared with the SFT read-out and SFT+ICT
of an earlier run only where that comparison is exact: the same settings (everything that shapes the start, the
training or the scores), the same exits, every seed present, and a QuAILoRA start whose scores agree to the digits
the table prints (so the two runs trained from the same start).
"""

from __future__ import annotations

import copy


ARMS = ("soft", "sft", "ict")
EXIT_FRACTIONS = [0.25, 0.5, 0.75, 1.0]  # the exits: about L/4, L/2, 3L/4 and L

# Settings that do not shape the SFT and SFT+ICT numbers: which arms and seeds ran, the SoFT arm's weights, where
# the JSON went, and the cost part's options.
IGNORED_SETTINGS = {"models", "seeds", "arms", "soft_exit_weights", "output", "report", "baseline", "probe",
                    "skip_quality", "skip_cost", "timing_steps"}
ARM_KEYS = {"soft": "soft", "sft": "sft", "ict": "sft+ict"}


def parse_arms(text: str) -> list[str]:
    """`--arms` as a list; ValueError on an unknown arm, an empty list, or `ict` without `sft`."""
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f"--arms {text!r}: give a comma-separated subset of {', '.join(ARMS)} (unknown: {unknown}).")
    if "ict" in arms and "sft" not in arms:
        raise ValueError(f"--arms {text!r}: ict tunes on the sft adapter, so it needs sft too (e.g. `sft,ict`).")
    return arms


def parse_exit_weights(text: str | None) -> list[float] | None:
    """`--soft-exit-weights` as floats, one per exit (None: 1 each); ValueError unless 4 positive finite numbers."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--soft-exit-weights {text!r}: give comma-separated numbers ({error}).") from None
    if len(weights) != len(EXIT_FRACTIONS) or not all(0 < w < float("inf") for w in weights):
        raise ValueError(f"--soft-exit-weights {text!r}: give {len(EXIT_FRACTIONS)} positive finite numbers, one "
                         f"per exit (at {EXIT_FRACTIONS} of the depth), e.g. 0.3,0.3,0.3,1.")
    return weights


def _start_digits(start: dict) -> dict:
    """The start's scores as the table prints them (loss `.3f`, perplexity `.3g`)."""
    return {k: (f"{s['loss']:.3f}", f"{s['perplexity']:.3g}") for k, s in start.items()}


def merge_baseline(record: dict, baseline: dict, baseline_name: str = "the baseline") -> dict:
    """A copy of `record` whose runs also hold the arms they lack, taken from `baseline` at the same seeds.

    Args:
        record (`dict`): a result JSON of `bench/bench_soft_depth.py` (`settings`, `quality`, `cost`).
        baseline (`dict`): an earlier result JSON that ran the missing arms.
        baseline_name (`str`): how errors and the table name the baseline (its path).

    Returns:
        `dict`: the merged record; `quality[model]["baseline_arms"]` lists the arms taken from the baseline.

    Raises:
        ValueError: a setting that shapes the numbers differs, the exits differ, a seed or model is missing from the
            baseline, or the two starts' scores differ at the printed digits.

    Example: `merge_baseline(json.load(open("soft-only.json")), json.load(open("all-arms.json")))`.
    """
    mine, theirs = record["settings"], baseline["settings"]
    differing = sorted(key for key in (set(mine) | set(theirs)) - IGNORED_SETTINGS if mine.get(key) != theirs.get(key))
    if differing:
        raise ValueError(f"{baseline_name} was run with other settings: "
                         + ", ".join(f"{key} {theirs.get(key)!r} (this run: {mine.get(key)!r})" for key in differing))
    merged = copy.deepcopy(record)
    for model_name, result in merged["quality"].items():
        other = baseline["quality"].get(model_name)
        if other is None:
            raise ValueError(f"{baseline_name} has no {model_name} results.")
        if other["exits"] != result["exits"]:
            raise ValueError(f"{baseline_name}'s exits {other['exits']} differ from this run's {result['exits']}.")
        if _start_digits(other.get("start", {})) != _start_digits(result.get("start", {})):
            raise ValueError(f"{baseline_name}'s QuAILoRA start scores {_start_digits(other.get('start', {}))} differ "
                             f"from this run's {_start_digits(result.get('start', {}))}: not the same start.")
        taken = set()
        for seed, run in result["runs"].items():
            if seed not in other["runs"]:
                raise ValueError(f"{baseline_name} has no seed {seed} for {model_name} (it has "
                                 f"{sorted(other['runs'])}).")
            for arm in ARM_KEYS.values():
                if arm not in run and arm in other["runs"][seed]:
                    run[arm] = copy.deepcopy(other["runs"][seed][arm])
                    taken.add(arm)
        result["baseline_arms"] = [arm for arm in ARM_KEYS.values() if arm in taken]
        result["baseline"] = baseline_name
    return merged

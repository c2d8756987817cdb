"""The arms of the fine-tuning comparison, its settings (`CompareScriptArguments`) and their checks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from hf_quailora.dynamic_rank.spec import check_ranks, parse_ranks
from hf_quailora.embedded.data import ALPACA_HOLDOUT
from hf_quailora.embedded.models import EMBEDDED_MODELS, is_embedded_model


# arm -> (quantization, init solver or None for B = 0, dynamic-rank training)
ARMS: dict[str, tuple[str, str | None, bool]] = {
    "qlora": ("nf4", None, False),
    "svd": ("nf4", "svd", False),
    "quailora": ("nf4", "closed_form", False),
    "int8": ("int8", None, False),
    "fp32": ("none", None, False),
    "dynamic": ("nf4", "closed_form", True),
}
ARM_LABELS = {
    "qlora": "QLoRA (NF4, B = 0)",
    "svd": "SVD start (NF4, uncalibrated)",
    "quailora": "QuAILoRA (NF4, closed form)",
    "int8": "LLM.int8 base (B = 0)",
    "fp32": "fp32 base (B = 0)",
    "dynamic": "dynamic rank (NF4, QuAILoRA, r_max)",
}
SCALED_ARM = "quailora"  # the arm `--quailora_lr_scale` runs once per scale, as `quailora@lr<scale>`
ALPACA_TRAIN = "alpaca_train"  # `--calibration_data`: windows of the arm's own training examples, never the held-out


def base_arm(name: str) -> str:
    """The arm of `ARMS` behind a run's arm name: `"quailora@lr0.5"` → `"quailora"` (others unchanged)."""
    return name.partition("@lr")[0]


def lr_scale(name: str) -> float:
    """The learning-rate scale of a run's arm name: `"quailora@lr0.5"` → 0.5; 1 for every unscaled arm."""
    return float(name.partition("@lr")[2] or 1)


def scaled_name(scale: float) -> str:
    """The arm name of QuAILoRA at `scale` × `--learning_rate`: `"quailora"` at 1 (so it is the stored arm of
    earlier runs), else `"quailora@lr<scale>"` (e.g. `quailora@lr0.5`)."""
    return SCALED_ARM if scale == 1 else f"{SCALED_ARM}@lr{scale:g}"


def arm_label(name: str) -> str:
    """The table label of a run's arm name (the scaled QuAILoRA arms carry their learning-rate scale)."""
    label = ARM_LABELS[base_arm(name)]
    return label if lr_scale(name) == 1 else f"{label}, lr × {lr_scale(name):g}"


def arm_order(name: str) -> tuple[int, float]:
    """Sort key of run arm names: the order of `ARMS`, then the larger learning rate first."""
    return list(ARMS).index(base_arm(name)), -lr_scale(name)


def parse_lr_scales(text: str) -> list[float]:
    """`--quailora_lr_scale` → positive finite scales, e.g. `"1,0.5,0.25"` → `[1.0, 0.5, 0.25]`.

    Raises:
        ValueError: naming `--quailora_lr_scale`, when it is empty, holds a non-number, a value ≤ 0 or not finite,
            or repeats a scale.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        scales = [float(part) for part in parts]
    except ValueError as err:
        raise ValueError(f"`--quailora_lr_scale` ({text!r}) must be comma-separated numbers, e.g. 1,0.5,0.25.") from err
    bad = [scale for scale in scales if not (math.isfinite(scale) and scale > 0)]
    if not scales or bad:
        raise ValueError(f"`--quailora_lr_scale` ({text!r}) needs positive finite numbers, e.g. 1,0.5,0.25; "
                         f"{'it is empty' if not scales else f'got {bad}'}.")
    if len({scaled_name(scale) for scale in scales}) != len(scales):
        raise ValueError(f"`--quailora_lr_scale` ({text!r}) repeats a scale; name each once.")
    return scales


@dataclass
class CompareScriptArguments:
    """Settings of the fine-tuning comparison benchmark.

    Parameters:
        > Arms and model

        arms (`str`, defaults to all six): comma-separated subset of `qlora,svd,quailora,int8,fp32,dynamic`.
        model_name_or_path (`str`, defaults to `"smollm2-135m"`): embedded name, folder or Hub id.
        models (`str`, *optional*): comma-separated models to run one after another (overrides
            `model_name_or_path`); BOS starts every perplexity/calibration window of models that need it (Gemma).
        rank (`int`, defaults to 16): LoRA r; `lora_alpha = r` (scaling 1).
        ranks (`str`, *optional*): comma-separated ranks to run (overrides `rank`), e.g. `"16,64"`.
        target_modules (`str`, defaults to `"all-linear"`): peft target modules (comma-separated or all-linear).

        > Training

        steps (`int`, defaults to 40): optimizer steps of every arm.
        batch_size (`int`, defaults to 4): examples per step.
        learning_rate (`float`, defaults to 2e-4), lr_scheduler_type (`str`, defaults to `"constant"`).
        max_length (`int`, defaults to 256): tokens per training/eval example (prompt + response, truncated).
        seed (`int`, defaults to 42): the same for every arm (LoRA A init, data order, dropout-free).
        seeds (`str`, *optional*): comma-separated seeds (overrides `seed`), e.g. `"1,2,3"`: every arm runs once
            per seed; the summary gives the mean ± standard deviation over seeds.
        adapter_dtype (`str`, defaults to `"float32"`): trl casts adapters of quantized models to bf16; we cast them
            back so every arm trains fp32 adapters (`"bfloat16"` keeps trl's QLoRA behaviour for the 8/4-bit arms).

        > Data

        train_data (`str`, defaults to `"alpaca"`): Alpaca-format data (embedded name or local JSON).
        train_examples (`int`, *optional*): training examples, taken from the front; default: all before the
            held-out tail.
        holdout_examples (`int`, defaults to `ALPACA_HOLDOUT` = 200): the tail of the data never trained on (the
            project's lm-eval tasks use the same tail of the embedded Alpaca data, `split_holdout`).
        eval_examples (`int`, defaults to 200): the last examples (within the held-out tail) whose response loss is
            reported; lower it to save time on a CPU.
        curve_eval_examples (`int`, *optional*): score the periodic evaluations (the convergence curve) on only the
            last this many of the evaluated examples; the start and the end are still scored on all of them (on a
            CPU the Alpaca loss on 200 examples costs about twelve times the perplexity on 16 windows).
        perplexity_data (`str`, defaults to `"wiki"`), eval_windows (`int`, defaults to 16), window_length (256).
        calibration_data (`str`, defaults to `"c4"`), calibration_windows (`int`, defaults to 32):
            `"alpaca_train"` calibrates on the arm's own training examples (prompt and response, never the held-out
            tail); any other value is text loaded by `load_dataset_any` (`c4`, `wiki`, a file).
        quailora_lr_scale (`str`, *optional*): comma-separated scales, e.g. `"1,0.5,0.25"`: the `quailora` arm runs
            once per scale at `learning_rate × scale`, stored as its own arm `quailora@lr<scale>` (`quailora` at
            1); every other arm keeps `learning_rate`.
        cloze_examples (`int`, *optional*): score the offline lm-eval task `quailora_wiki_cloze` (last-word
            accuracy, chance 25%) on its first this many documents at the start and the end of every arm.

        > Evaluation and dynamic rank

        eval_steps (`int`, defaults to 10): evaluate every this many steps (and at start and end).
        eval_batch_size (`int`, defaults to 8): sequences per evaluation forward (2 for Gemma's 262k vocabulary).
        dynamic_eval_ranks (`str`, defaults to `"1,2,4,8,16"`), dynamic_update_rule (`str`, defaults to `"nested"`).

        > Run

        output_dir (`str`), threads (`int`, defaults to 1): torch threads (stated in the results).
        summary_only (`bool`, defaults to `False`): train nothing; summarise the arms finished in `output_dir`.

    Every finished arm is written to `output_dir/runs/<model>/r<rank>/seed<seed>/<arm>.json` (atomically) and
    skipped when the benchmark runs again with the same settings, so an interrupted run resumes where it stopped.
    """

    # Arms and model
    arms: str = field(default="qlora,svd,quailora,int8,fp32,dynamic", metadata={"help": "Comma-separated arms."})
    model_name_or_path: str = field(default="smollm2-135m", metadata={"help": "Embedded name, folder or Hub id."})
    models: str | None = field(default=None, metadata={"help": "Comma-separated models (overrides the above)."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r (lora_alpha = r)."})
    ranks: str | None = field(default=None, metadata={"help": "Comma-separated ranks (overrides --rank)."})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules (comma-separated)."})
    # Training
    steps: int = field(default=40, metadata={"help": "Optimizer steps of every arm."})
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    max_length: int = field(default=256, metadata={"help": "Tokens per training/eval example."})
    seed: int = field(default=42, metadata={"help": "Seed shared by every arm."})
    seeds: str | None = field(default=None, metadata={"help": "Comma-separated seeds (overrides --seed)."})
    adapter_dtype: str = field(
        default="float32", metadata={"help": "Dtype of the trained adapter.", "choices": ["float32", "bfloat16"]}
    )
    # Data
    train_data: str = field(default="alpaca", metadata={"help": "Alpaca-format data: embedded name or JSON file."})
    train_examples: int | None = field(
        default=None, metadata={"help": "Training examples (default: all but the tail)."}
    )
    holdout_examples: int = field(
        default=ALPACA_HOLDOUT, metadata={"help": "Tail of the Alpaca data never trained on."}
    )
    eval_examples: int = field(
        default=ALPACA_HOLDOUT, metadata={"help": "Last examples whose response loss is reported (≤ holdout)."}
    )
    curve_eval_examples: int | None = field(
        default=None, metadata={"help": "Examples of the periodic evaluations (default: all evaluated examples)."}
    )
    perplexity_data: str = field(default="wiki", metadata={"help": "Held-out text for perplexity."})
    eval_windows: int = field(default=16, metadata={"help": "Held-out perplexity windows."})
    window_length: int = field(default=256, metadata={"help": "Tokens per perplexity/calibration window."})
    calibration_data: str = field(default="c4", metadata={"help": "QuAILoRA calibration text."})
    calibration_windows: int = field(default=32, metadata={"help": "QuAILoRA calibration windows."})
    quailora_lr_scale: str | None = field(
        default=None, metadata={"help": "Comma-separated learning-rate scales of the quailora arm, e.g. 1,0.5,0.25."}
    )
    cloze_examples: int | None = field(
        default=None, metadata={"help": "quailora_wiki_cloze documents scored at the start and end (default: none)."}
    )
    # Evaluation and dynamic rank
    eval_steps: int = field(default=10, metadata={"help": "Evaluate every this many steps."})
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per evaluation forward."})
    dynamic_eval_ranks: str = field(default="1,2,4,8,16", metadata={"help": "Ranks of the dynamic arm's curve."})
    dynamic_update_rule: str = field(
        default="nested", metadata={"help": "DyLoRA update rule.", "choices": ["nested", "frozen"]}
    )
    # Run
    output_dir: str = field(default="outputs/compare_init", metadata={"help": "Where results are written."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    summary_only: bool = field(default=False, metadata={"help": "Only summarise the arms finished in output_dir."})


def parse_arms(text: str) -> list[str]:
    """`--arms` → arm names; raises ValueError on an empty list, an unknown arm or a repeated one."""
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if not arms or unknown:
        raise ValueError(f"`--arms` ({text!r}) holds unknown arms {unknown}; choose among {', '.join(ARMS)}.")
    if len(set(arms)) != len(arms):
        raise ValueError(f"`--arms` ({text!r}) repeats an arm; name each once.")
    return arms


def parse_dynamic_eval_ranks(text: str, rank: int) -> list[int]:
    """`--dynamic_eval_ranks` → sorted unique ranks in `[1, rank]`, by the library's `parse_ranks`/`check_ranks`.

    Raises:
        ValueError: naming `--dynamic_eval_ranks`, when `text` is not comma-separated integers or holds a rank
            outside `[1, rank]`.
    """
    try:
        ranks = parse_ranks(text)
    except ValueError as err:
        raise ValueError(f"`--dynamic_eval_ranks` ({text!r}): {err}") from err
    check_ranks(ranks, 1, rank, "--dynamic_eval_ranks", "the adapter's ranks (`--rank`)")
    return ranks


def parse_integers(text: str, name: str, minimum: int) -> list[int]:
    """`"1,2,3"` → `[1, 2, 3]`; raises ValueError naming `--name` when empty, not integers, repeated or below
    `minimum`."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"`--{name}` ({text!r}) is empty; give comma-separated integers, e.g. `--{name} 1,2,3`.")
    try:
        values = [int(part) for part in parts]
    except ValueError as err:
        raise ValueError(f"`--{name}` ({text!r}) must be comma-separated integers.") from err
    below = [value for value in values if value < minimum]
    if below:
        raise ValueError(f"`--{name}` ({text!r}) holds {below}; each must be at least {minimum}.")
    if len(set(values)) != len(values):
        raise ValueError(f"`--{name}` ({text!r}) repeats a value; name each once.")
    return values


def needs_bos(model: str) -> bool:
    """Whether every perplexity/calibration window of `model` must start with BOS (the embedded Gemma)."""
    return is_embedded_model(model) and EMBEDDED_MODELS[model.lower()].needs_bos


def parse_models(text: str) -> list[str]:
    """`--models` → names; raises ValueError for an empty list or a name that is neither an embedded model, an
    existing folder, nor (with the Hub reachable) an `owner/name` Hub id."""
    models = [model.strip() for model in text.split(",") if model.strip()]
    if not models:
        raise ValueError(f"`--models` ({text!r}) is empty; name at least one model, e.g. `smollm2-135m`.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    unknown = [
        model for model in models
        if not (is_embedded_model(model) or os.path.isdir(model)
                or (not offline and model.count("/") == 1 and not model.startswith((".", "/"))))
    ]
    if unknown:
        raise ValueError(
            f"Unknown model(s) {unknown}: not an embedded name ({', '.join(EMBEDDED_MODELS)}), an existing folder"
            f"{'' if offline else ', or a Hub id'}{' (HF_HUB_OFFLINE is set)' if offline else ''}."
        )
    if len(set(models)) != len(models):
        raise ValueError(f"`--models` ({text!r}) repeats a model; name each once.")
    return models


@dataclass
class RunPlan:
    """What the benchmark runs: every arm for every model × rank × seed, and each rank's dynamic evaluation ranks."""

    arms: list[str]
    models: list[str]
    ranks: list[int]
    seeds: list[int]
    dynamic_ranks: dict[int, list[int]] | None


# the settings a finished arm must share with the current run to be reused (resume) or summarised with it
RESUME_KEYS = (
    "target_modules", "steps", "batch_size", "learning_rate", "lr_scheduler_type", "max_length", "adapter_dtype",
    "train_data", "train_examples", "holdout_examples", "eval_examples", "curve_eval_examples", "perplexity_data",
    "eval_windows", "window_length", "calibration_data", "calibration_windows", "eval_steps", "dynamic_update_rule",
    "cloze_examples",
)
CALIBRATION_KEYS = ("calibration_data", "calibration_windows")  # of RESUME_KEYS, those only QuAILoRA's arms depend on


def check_arguments(args: CompareScriptArguments) -> RunPlan:
    """Every check that can fail before a model is loaded; returns the plan of runs."""
    arms = parse_arms(args.arms)
    for name in ("steps", "rank", "batch_size", "eval_steps", "eval_windows", "eval_examples", "holdout_examples",
                 "threads", "eval_batch_size"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`--{name}` ({value!r}) must be an integer of at least 1.")
    ranks = parse_integers(args.ranks, "ranks", 1) if args.ranks is not None else [args.rank]
    seeds = parse_integers(args.seeds, "seeds", 0) if args.seeds is not None else [args.seed]
    if args.eval_examples > args.holdout_examples:
        raise ValueError(
            f"`--eval_examples` ({args.eval_examples}) exceeds `--holdout_examples` ({args.holdout_examples}): "
            "evaluated examples must be held out from training; lower the first or raise the second."
        )
    if args.curve_eval_examples is not None and not 1 <= args.curve_eval_examples <= args.eval_examples:
        raise ValueError(f"`--curve_eval_examples` ({args.curve_eval_examples}) must lie in [1, --eval_examples "
                         f"({args.eval_examples})] (or be omitted).")
    if args.train_examples is not None and args.train_examples < 1:
        raise ValueError(f"`--train_examples` ({args.train_examples}) must be at least 1 (or omitted).")
    if args.max_length < 8 or args.window_length < 8:
        raise ValueError(
            f"`--max_length` ({args.max_length}) and `--window_length` ({args.window_length}) must be at least 8."
        )
    if any(ARMS[arm][1] in ("closed_form",) for arm in arms) and args.calibration_windows < 1:
        raise ValueError(f"`--calibration_windows` ({args.calibration_windows}) must be ≥ 1 for QuAILoRA arms.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(f"`--learning_rate` ({args.learning_rate}) must be a positive number.")
    if args.cloze_examples is not None and (isinstance(args.cloze_examples, bool) or args.cloze_examples < 1):
        raise ValueError(f"`--cloze_examples` ({args.cloze_examples}) must be at least 1 (or omitted).")
    if args.quailora_lr_scale is not None:
        scales = parse_lr_scales(args.quailora_lr_scale)
        if SCALED_ARM not in arms:
            raise ValueError(f"`--quailora_lr_scale` scales the `{SCALED_ARM}` arm; add it to `--arms` ({args.arms!r}).")
        index = arms.index(SCALED_ARM)
        arms = arms[:index] + [scaled_name(scale) for scale in scales] + arms[index + 1:]
    dynamic_ranks = None
    if "dynamic" in arms:
        listed = parse_dynamic_eval_ranks(args.dynamic_eval_ranks, max(ranks))
        dynamic_ranks = {rank: sorted({b for b in listed if b <= rank} | {rank}) for rank in ranks}
    models = args.models if args.models is not None else args.model_name_or_path
    models = [] if args.summary_only else parse_models(models)
    return RunPlan(arms, models, ranks, seeds, dynamic_ranks)

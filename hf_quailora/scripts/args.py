"""The recipes' argument dataclasses: trl's `ModelConfig` and `ScriptArguments`, `QuAILoRAConfig`, the recipe's own.

Every recipe that loads a model (`recipes/alpaca.py`, `recipes/quailora_init.py`) parses the same classes, so a flag
has one name everywhere: trl's wherever trl has one, and each dataclass's own field name (no flag mirrors a field):

| class | holds | parent |
|---|---|---|
| `RecipeModelConfig` | model, quantization, LoRA (`--load_in_4bit`, `--lora_r`, ...) | trl's `ModelConfig` |
| `RecipeDataArguments` | training data (`--dataset_name`, splits), held-out examples | trl's `ScriptArguments` |
| `RecipeQuAILoRAConfig` | calibration and solver (`--calibration_samples`, `--solver`, ...) | `QuAILoRAConfig` |
| `RecipeArguments` | QuAILoRA on/off, calibration text, the final rank sweep and exports | none |

These are data with checks: every check runs when the arguments are parsed or in `check_recipe_arguments`, before
any model loads. `hf_quailora/scripts/models.py` loads the model they describe (with trl's
`get_quantization_config` and `get_peft_config`).

Example:

```python
from hf_quailora.scripts import RecipeModelConfig, RecipeParser, RecipeQuAILoRAConfig, load_recipe_model

model_args, quailora_args = RecipeParser((RecipeModelConfig, RecipeQuAILoRAConfig)).parse_args_and_config(
    ["--load_in_4bit", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "--calibration_samples", "16"]
)
model, tokenizer = load_recipe_model(model_args)  # the NF4 base wrapped in a LoRA of rank 8 on q_proj and v_proj
```
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from trl import ModelConfig, ScriptArguments

from ..embedded.data import ALPACA_HOLDOUT
from ..embedded.models import DEFAULT_MODEL
from ..quailora.config import QuAILoRAConfig, accept_renamed_options
from ..quantization import QUANTIZATIONS
from .calibration import TRAIN_CALIBRATION


__all__ = [
    "DTYPE_CHOICES", "TRAINING_ONLY_OPTIONS", "RecipeArguments", "RecipeDataArguments", "RecipeModelConfig",
    "RecipeQuAILoRAConfig", "check_recipe_arguments",
]

DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]


_SHORTHAND = "`--quantization nf4|fp4|int8|none` is short for `--load_in_4bit --bnb_4bit_quant_type nf4|fp4`, " \
             "`--load_in_8bit`, or a full-precision base"


@dataclass
class RecipeModelConfig(ModelConfig):
    """trl's `ModelConfig` with the recipes' defaults and checks: what the base is, how it is quantized, its LoRA.

    Pure data: `hf_quailora.scripts.models` turns it into a dtype, a `BitsAndBytesConfig`, a `LoraConfig` and the
    loaded model (`load_recipe_model`).

    Parameters:
        Every field of trl's `ModelConfig`, plus:

        quantization (`str`, *optional*): shorthand for trl's quantization flags: `"nf4"`/`"fp4"` =
            `load_in_4bit` with that `bnb_4bit_quant_type`, `"int8"` = `load_in_8bit`, `"none"` = full precision.
            It may be combined with trl's flags only when they agree. With neither, the base loads in NF4.
        double_quant (`bool`, *optional*): deprecated name of `use_bnb_nested_quant`.

        > Defaults that differ from trl's `ModelConfig` (QLoRA's settings, offline-safe)

        model_name_or_path (`str`, defaults to `"smollm2-135m"`): the embedded model (no Hub needed); a folder or a
            Hub id works too.
        dtype (`str`, *optional*): `None` means bfloat16 on a GPU, float32 on a CPU (trl: `"float32"`); also the
            4-bit compute dtype.
        use_peft (`bool`, defaults to `True`): the recipes need LoRA; `False` is refused.
        lora_alpha (`int`, *optional*): defaults to `lora_r` (scaling 1; trl: 32).
        lora_dropout (`float`, defaults to `0.0`).
        lora_target_modules (`list[str]`, defaults to `["all-linear"]`): space- or comma-separated module names.
        load_in_4bit (`bool`, defaults to `False`): the base loads in 4 bit anyway unless `load_in_8bit` or
            `quantization` says otherwise (trl: full precision without a flag).
        bnb_4bit_quant_type (`str`, *optional*): `"nf4"` unless `--quantization fp4` says otherwise.
        use_bnb_nested_quant (`bool`, defaults to `True`): QLoRA's double quantization (trl: `False`).

    Raises:
        ValueError: `load_in_4bit` with `load_in_8bit`, a `quantization` that contradicts them, and options the
            recipes do not support (`use_dora`, `lora_target_parameters`, `lora_modules_to_save`, a task type other
            than `CAUSAL_LM`), each naming the flag.
    """

    # Defaults that differ from trl's ModelConfig
    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL, metadata={"help": "Embedded name (smollm2-135m, gemma3-270m), folder or Hub id."}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights and 4-bit compute dtype (default: bfloat16 on a GPU, float32 on a CPU).",
                  "choices": DTYPE_CHOICES},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the recipes need it)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "LoRA target modules, space- or comma-separated."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base in 4 bit (the recipes' default anyway, unless --load_in_8bit "
                                         "or --quantization says otherwise)."}
    )
    bnb_4bit_quant_type: str | None = field(
        default=None, metadata={"help": "4-bit quantization type (default: nf4).", "choices": ["fp4", "nf4"]}
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Double quantization of the 4-bit statistics (QLoRA's default)."}
    )
    # The recipes' own
    quantization: str | None = field(
        default=None,
        metadata={"help": "Shorthand: nf4/fp4 = --load_in_4bit with that type, int8 = --load_in_8bit, none = full "
                          "precision (default: nf4 unless --load_in_8bit).", "choices": list(QUANTIZATIONS)},
    )
    double_quant: bool | None = field(default=None, metadata={"help": "Deprecated: use --use_bnb_nested_quant."})

    def __post_init__(self):
        # trl's own check says "You can't use 8 bit and 4 bit precision at the same time", naming no flag
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "`--load_in_4bit` and `--load_in_8bit` were both given; choose one (4-bit NF4/FP4 or LLM.int8)."
            )
        super().__post_init__()
        if self.double_quant is not None:
            warnings.warn("`double_quant` is deprecated; use `use_bnb_nested_quant`.", FutureWarning, stacklevel=2)
            self.use_bnb_nested_quant, self.double_quant = self.double_quant, None
        self.lora_target_modules = _split_modules(self.lora_target_modules)
        if self.lora_r < 1:
            raise ValueError(f"`--lora_r` ({self.lora_r}) must be at least 1.")
        if self.lora_alpha is None:
            self.lora_alpha = self.lora_r
        self._resolve_quantization()
        self._refuse_unsupported()

    def _resolve_quantization(self) -> None:
        """Reconcile `quantization` with trl's flags, then set both (so that parsing twice gives the same)."""
        quant, kind = self.quantization, self.bnb_4bit_quant_type
        if quant is not None and quant not in QUANTIZATIONS:
            raise ValueError(f"`--quantization` must be one of {QUANTIZATIONS}; got {quant!r}.")
        if self.load_in_8bit and kind is not None:
            raise ValueError(
                f"`--bnb_4bit_quant_type {kind}` applies to 4-bit loading, not `--load_in_8bit`; remove one of them."
            )
        if quant is None:
            quant = "int8" if self.load_in_8bit else kind or "nf4"
        conflicts = {
            "nf4": self.load_in_8bit or kind not in (None, quant),
            "fp4": self.load_in_8bit or kind not in (None, quant),
            "int8": self.load_in_4bit or kind is not None,
            "none": self.load_in_4bit or self.load_in_8bit or kind is not None,
        }
        if conflicts[quant]:
            flags = (("--load_in_4bit", self.load_in_4bit), ("--load_in_8bit", self.load_in_8bit),
                     (f"--bnb_4bit_quant_type {kind}", kind is not None))
            given = [flag for flag, on in flags if on]
            raise ValueError(
                f"`--quantization {quant}` contradicts `{' '.join(given)}`; give one of them ({_SHORTHAND})."
            )
        self.quantization = quant
        self.load_in_4bit, self.load_in_8bit = quant in ("nf4", "fp4"), quant == "int8"
        self.bnb_4bit_quant_type = quant if self.load_in_4bit else None

    def _refuse_unsupported(self) -> None:
        if self.use_dora:
            raise ValueError(
                "`--use_dora` is not supported: QuAILoRA's start and dynamic-rank truncation work on the plain LoRA "
                "factors A and B, and DoRA adds a magnitude vector computed from the full-rank update. Remove "
                "`--use_dora`."
            )
        if self.lora_target_parameters is not None:
            raise ValueError(
                f"`--lora_target_parameters` ({self.lora_target_parameters}) is not supported: LoRA on parameters "
                "is applied through its delta weight, which dynamic rank cannot truncate. Target linear modules "
                "with `--lora_target_modules` instead."
            )
        if self.lora_modules_to_save is not None:
            raise ValueError(
                f"`--lora_modules_to_save` ({self.lora_modules_to_save}) is not supported by the recipes: fully "
                "trained modules have no rank to truncate or export. Remove it."
            )
        if self.lora_task_type != "CAUSAL_LM":
            raise ValueError(f"`--lora_task_type` must be CAUSAL_LM for these recipes; got {self.lora_task_type!r}.")


def _split_modules(modules):
    """`["q_proj", "v_proj"]`, `["q_proj,v_proj"]` and `"q_proj,v_proj"` alike.

    trl turns a single name into a string, which peft then reads as a regular expression matched against the whole
    module path, so `--lora_target_modules q_proj` would match nothing: one name stays a list, except `all-linear`.
    """
    if modules is None:
        return None
    items = [modules] if isinstance(modules, str) else list(modules)
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    if not names:
        raise ValueError("`--lora_target_modules` is empty; name the modules, e.g. `q_proj v_proj`, or all-linear.")
    return "all-linear" if names == ["all-linear"] else names


@dataclass
class RecipeDataArguments(ScriptArguments):
    """trl's `ScriptArguments` (which dataset, which splits) with the recipes' default and hold-out options.

    Parameters:
        dataset_name (`str`, defaults to `"alpaca"`): the embedded Alpaca, a local `.json`/`.jsonl`/`.txt` file or
            folder, or a Hub id. Any format `SFTTrainer` takes (conversational `messages`, prompt-completion,
            text); Alpaca columns (`instruction`/`input`/`output`) are turned into prompt-completion.
        dataset_config, dataset_train_split, dataset_test_split: trl's, for Hub datasets. Without a test split
            (local files, the embedded data), the last `eval_holdout` training examples are held out.
        eval_holdout (`int`, defaults to 200): examples held out from the end of the training split.
        num_eval_examples (`int`, defaults to 32): held-out examples that `evaluate()` scores.
        num_train_examples (`int`, *optional*): cap on the training examples.

    Raises:
        ValueError: `dataset_streaming` or `ignore_bias_buffers` (not supported), a non-positive size.
    """

    dataset_name: str | None = field(
        default="alpaca", metadata={"help": "Embedded 'alpaca', a .json/.jsonl/.txt file or folder, or a Hub id."}
    )
    eval_holdout: int = field(default=ALPACA_HOLDOUT, metadata={"help": "Last examples held out (no test split)."})
    num_eval_examples: int = field(default=32, metadata={"help": "Held-out examples used by evaluate()."})
    num_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})

    def __post_init__(self):
        if not self.dataset_name:
            raise ValueError("`--dataset_name` is empty; give 'alpaca', a local file or a Hub id.")
        if self.dataset_streaming:
            raise ValueError("`--dataset_streaming` is not supported: the recipes hold out examples by index.")
        if self.ignore_bias_buffers:
            raise ValueError("`--ignore_bias_buffers` is not used by the recipes; remove it.")
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise ValueError(f"`num_train_examples` ({self.num_train_examples}) must be at least 1 (or unset).")
        if self.num_eval_examples < 1 or self.eval_holdout < self.num_eval_examples:
            raise ValueError(
                f"`num_eval_examples` ({self.num_eval_examples}) must be between 1 and `eval_holdout` "
                f"({self.eval_holdout})."
            )


@accept_renamed_options
@dataclass
class RecipeQuAILoRAConfig(QuAILoRAConfig):
    """`QuAILoRAConfig` as the recipes parse it: each flag is the field's name, only two defaults differ.

    Parameters:
        Every field of `QuAILoRAConfig`: `--calibration_samples`, `--calibration_length`, `--calibration_batch_size`,
        `--solver`, `--als_iterations`, `--damping`, `--solve_dtype`, `--solve_device`, `--report_svd_baseline`,
        `--streaming`, `--memory_budget`, `--gram_device`, `--gram_dtype`, `--keep_gram_statistics`,
        `--show_progress`; their checks run when the arguments are parsed, and their errors name the flag.

        > Defaults that differ from `QuAILoRAConfig` (a CPU demo calibrates in seconds)

        calibration_samples (`int`, defaults to 32): the library's default is 128.
        calibration_length (`int`, defaults to 256): the library's default is 512.
    """

    calibration_samples: int | None = field(default=32, metadata={"help": "Calibration sequences to run."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})


@dataclass
class RecipeArguments:
    """The recipe-only options, one name each in every recipe: QuAILoRA on/off, calibration text, sweep and export.

    Parameters:
        > QuAILoRA initialisation (its settings: `RecipeQuAILoRAConfig`)

        quailora (`bool`, defaults to `True`): initialise LoRA with QuAILoRA (`False`: QLoRA's B = 0 start).
        calibration_dataset (`str`, defaults to `"auto"`): calibration text (embedded name, file or Hub id), or
            `"train"`: the recipe's own training examples, never the held-out ones, as windows of
            `calibration_length` tokens, with C4 instead (logged) when they fill fewer than `calibration_samples`
            (`scripts/calibration.py`; the init-only recipes have no training data and refuse it; a local file
            named `train` needs a path such as `./train`), or `"auto"`: `"train"` in a recipe that trains, C4 in
            an init-only one. Calibrated on the training examples, the start closed more of the NF4 → int8 gap of
            the Alpaca validation perplexity after 40 steps than on C4, on both embedded models (bench/RESULTS.md,
            "Issue 36: calibrating on the task").

        > Final rank sweep and exports (recipes that train)

        sweep_tasks (`str`, defaults to `"quailora_wiki_ppl"`): lm-eval tasks of the final sweep (`""`: skip).
        sweep_ranks (`str`, *optional*): ranks of the sweep, e.g. `"1,4,16"` (default: `eval_ranks`).
        sweep_limit (`int`, defaults to 16): documents per task.
        export_ranks (`str`, *optional*): ranks to save as plain peft adapters, e.g. `"4,16"`.
    """

    # QuAILoRA initialisation
    quailora: bool = field(default=True, metadata={"help": "Initialise LoRA with QuAILoRA (False: B = 0, QLoRA)."})
    calibration_dataset: str = field(default="auto", metadata={"help": "Calibration text (embedded name, file, Hub); 'train': the training examples; 'auto'."})
    # Final rank sweep and export
    sweep_tasks: str = field(
        default="quailora_wiki_ppl", metadata={"help": "lm-eval tasks of the final sweep ('' = skip)."}
    )
    sweep_ranks: str | None = field(default=None, metadata={"help": "Ranks of the final sweep (default: eval_ranks)."})
    sweep_limit: int | None = field(default=16, metadata={"help": "Documents per task in the final sweep."})
    export_ranks: str | None = field(default=None, metadata={"help": "Ranks to export as peft adapters, e.g. 4,16."})


TRAINING_ONLY_OPTIONS = ("sweep_tasks", "sweep_ranks", "sweep_limit", "export_ranks")


def check_recipe_arguments(model_args: RecipeModelConfig, recipe_args: RecipeArguments, trains: bool = True) -> None:
    """The checks every recipe shares, before anything loads (each dataclass checked its own fields when parsed).

    Args:
        model_args (`RecipeModelConfig`), recipe_args (`RecipeArguments`): the parsed arguments.
        trains (`bool`, defaults to `True`): `False` for a recipe that does not train (`quailora_init.py`): then the
            sweep and export options, and `--quailora false`, are refused rather than ignored.

    Raises:
        ValueError: `--use_peft false`; QuAILoRA on a full-precision base; training-only options, or
            `--calibration_dataset train`, given to a recipe that does not train.

    Example:

    ```python
    check_recipe_arguments(RecipeModelConfig(quantization="none"), RecipeArguments())  # ValueError: quantized base
    ```
    """
    if not model_args.use_peft:
        raise ValueError(
            "`--use_peft false`: the recipes train and initialise a LoRA adapter (QuAILoRA start, dynamic rank), so "
            "they need it. Remove `--use_peft false`."
        )
    if not trains:
        defaults = {f.name: f.default for f in fields(RecipeArguments)}
        given = [name for name in TRAINING_ONLY_OPTIONS if getattr(recipe_args, name) != defaults[name]]
        if given or not recipe_args.quailora:
            name = given[0] if given else "quailora"
            raise ValueError(f"`--{name}` applies to recipes that train (recipes/alpaca.py); this one initialises "
                             "LoRA with QuAILoRA only. Remove it.")
        if recipe_args.calibration_dataset == TRAIN_CALIBRATION:
            raise ValueError("`--calibration_dataset train` calibrates a training recipe's start on its training "
                             "data; this one has none: give a calibration text (c4, wiki, a file or a Hub id).")
    if recipe_args.quailora and model_args.quantization == "none":
        raise ValueError(
            "QuAILoRA corrects a quantization error: use a quantized base (`--load_in_4bit`, `--load_in_8bit`) or "
            "`--quailora false`."
        )

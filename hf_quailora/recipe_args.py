"""The command-line arguments of the recipes: trl's `ModelConfig` and `ScriptArguments`, and the recipe-only options.

Every recipe that loads a model (`recipes/alpaca.py`, `recipes/quailora_init.py`) parses the same three classes, so
a flag has one name everywhere, and the names are trl's wherever trl has one:

| class | holds | trl's |
|---|---|---|
| `RecipeModelConfig` | model, quantization, LoRA (`--load_in_4bit`, `--lora_r`, ...) | `ModelConfig` |
| `RecipeDataArguments` | training data (`--dataset_name`, splits), held-out examples | `ScriptArguments` |
| `RecipeArguments` | QuAILoRA on/off, calibration, solver, the final rank sweep and exports | none |

The quantization and LoRA configs are built by trl's own `get_quantization_config` and `get_peft_config`. Every
check runs when the arguments are parsed or in `check_recipe_arguments`, before any model loads.

Example:

```python
from trl import TrlParser
from hf_quailora.recipe_args import RecipeArguments, RecipeModelConfig

model_args, recipe_args = TrlParser((RecipeModelConfig, RecipeArguments)).parse_args_and_config(
    ["--load_in_4bit", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"]
)
model, tokenizer = model_args.load_model()  # the NF4 base wrapped in a LoRA of rank 8 on q_proj and v_proj
```
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, fields

import torch
from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from .embedded.data import ALPACA_HOLDOUT
from .quailora.config import DTYPES, GRAM_DEVICES, SOLVERS, STREAMING_MODES, QuAILoRAConfig
from .quantization import QUANTIZATIONS, load_quantized_model


DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]
_QUAILORA_DEFAULTS = {f.name: f.default for f in fields(QuAILoRAConfig)}  # one source for the solver's defaults


def _solver_option(name: str, help: str, choices=None):
    """A recipe flag for the `QuAILoRAConfig` field `name`, with that field's default."""
    metadata = {"help": help, **({"choices": list(choices)} if choices else {})}
    return field(default=_QUAILORA_DEFAULTS[name], metadata=metadata)


_SHORTHAND = "`--quantization nf4|fp4|int8|none` is short for `--load_in_4bit --bnb_4bit_quant_type nf4|fp4`, " \
             "`--load_in_8bit`, or a full-precision base"


@dataclass
class RecipeModelConfig(ModelConfig):
    """trl's `ModelConfig` with the recipes' defaults and checks: what the base is, how it is quantized, its LoRA.

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
        default="smollm2-135m", metadata={"help": "Embedded name (smollm2-135m, gemma3-270m), folder or Hub id."}
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

    def torch_dtype(self) -> torch.dtype | str:
        """The dtype to load with: `dtype`, or bfloat16 on a GPU and float32 on a CPU when it is unset."""
        if self.dtype is None:
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)

    def quantization_config(self):
        """The `BitsAndBytesConfig` from trl's `get_quantization_config` (`None` for a full-precision base)."""
        resolved, dtype = copy.copy(self), self.torch_dtype()
        default = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        resolved.dtype = default if dtype == "auto" else dtype  # trl passes `dtype` as the 4-bit compute dtype
        return get_quantization_config(resolved)

    def lora_config(self):
        """The peft `LoraConfig` from trl's `get_peft_config`."""
        return get_peft_config(self)

    def load_model(self, trust_remote_code: bool = False):
        """Load the base (quantized as asked) with `load_quantized_model` and wrap it in the LoRA of `lora_config()`.

        Returns:
            `(peft_model, tokenizer)`.
        """
        from peft import get_peft_model

        extra = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        model, tokenizer = load_quantized_model(
            self.model_name_or_path, self.quantization_config() or "none", compute_dtype=self.torch_dtype(),
            revision=self.model_revision, trust_remote_code=trust_remote_code, **extra,
        )
        return get_peft_model(model, self.lora_config()), tokenizer


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


@dataclass
class RecipeArguments:
    """The recipe-only options, one name each in every recipe: QuAILoRA, calibration, solver, sweep and export.

    Parameters:
        > QuAILoRA initialisation (see `QuAILoRAConfig` for each solver option)

        quailora (`bool`, defaults to `True`): initialise LoRA with QuAILoRA (`False`: QLoRA's B = 0 start).
        calibration_dataset (`str`, defaults to `"c4"`): calibration text (embedded name, file or Hub id).
        calibration_samples (`int`, defaults to 32), calibration_length (`int`, defaults to 256),
        calibration_batch_size (`int`, defaults to 8): calibration sequences, their tokens, sequences per pass.
        quailora_solver, quailora_als_iterations, quailora_damping, quailora_streaming, quailora_memory_budget,
        quailora_gram_device, quailora_gram_dtype, quailora_solve_dtype, quailora_show_progress,
        quailora_report_svd_baseline: `QuAILoRAConfig`'s `solver`, `als_iterations`, `damping`, `streaming`,
            `memory_budget`, `gram_device`, `gram_dtype`, `solve_dtype`, `show_progress`, `report_svd_baseline`.

        > Final rank sweep and exports (recipes that train)

        sweep_tasks (`str`, defaults to `"quailora_wiki_ppl"`): lm-eval tasks of the final sweep (`""`: skip).
        sweep_ranks (`str`, *optional*): ranks of the sweep, e.g. `"1,4,16"` (default: `eval_ranks`).
        sweep_limit (`int`, defaults to 16): documents per task.
        export_ranks (`str`, *optional*): ranks to save as plain peft adapters, e.g. `"4,16"`.
    """

    # QuAILoRA initialisation
    quailora: bool = field(default=True, metadata={"help": "Initialise LoRA with QuAILoRA (False: B = 0, QLoRA)."})
    calibration_dataset: str = field(default="c4", metadata={"help": "Calibration text (embedded name, file, Hub)."})
    calibration_samples: int = field(default=32, metadata={"help": "Calibration sequences."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    quailora_solver: str = _solver_option("solver", "Solver.", SOLVERS)
    quailora_als_iterations: int = _solver_option("als_iterations", "Iterations of the 'als' solver.")
    quailora_damping: float = _solver_option("damping", "Relative damping of the Gram matrices.")
    quailora_streaming: str = _solver_option("streaming", "Blocks calibrated at a time.", STREAMING_MODES)
    quailora_memory_budget: str = _solver_option(
        "memory_budget", "Bytes of Gram matrices alive at once ('auto': one block at a time)."
    )
    quailora_gram_device: str = _solver_option("gram_device", "Where Gram matrices accumulate.", GRAM_DEVICES)
    quailora_gram_dtype: str = _solver_option("gram_dtype", "Gram dtype.", DTYPES)
    quailora_solve_dtype: str = _solver_option("solve_dtype", "Solve dtype.", DTYPES)
    quailora_show_progress: bool = field(default=True, metadata={"help": "Progress bars during QuAILoRA."})
    quailora_report_svd_baseline: bool = _solver_option(
        "report_svd_baseline", "Also report the uncalibrated SVD start's errors (doubles closed-form work)."
    )
    # Final rank sweep and export
    sweep_tasks: str = field(
        default="quailora_wiki_ppl", metadata={"help": "lm-eval tasks of the final sweep ('' = skip)."}
    )
    sweep_ranks: str | None = field(default=None, metadata={"help": "Ranks of the final sweep (default: eval_ranks)."})
    sweep_limit: int | None = field(default=16, metadata={"help": "Documents per task in the final sweep."})
    export_ranks: str | None = field(default=None, metadata={"help": "Ranks to export as peft adapters, e.g. 4,16."})

    def quailora_config(self) -> QuAILoRAConfig:
        """The `QuAILoRAConfig` these options describe; its checks run here, their errors name the recipe's flags."""
        try:
            return QuAILoRAConfig(**{name: getattr(self, flag) for flag, name in QUAILORA_FLAGS.items()})
        except ValueError as err:
            message = str(err)
            for flag, name in QUAILORA_FLAGS.items():
                message = message.replace(f"`{name}`", f"`--{flag}`")
            raise ValueError(message) from err


# The recipe flag of each QuAILoRAConfig field
QUAILORA_FLAGS = {
    "calibration_samples": "num_samples", "calibration_length": "max_length", "calibration_batch_size": "batch_size",
    "quailora_solver": "solver", "quailora_als_iterations": "als_iterations", "quailora_damping": "damping",
    "quailora_streaming": "streaming", "quailora_memory_budget": "memory_budget",
    "quailora_gram_device": "gram_device", "quailora_gram_dtype": "gram_dtype", "quailora_solve_dtype": "solve_dtype",
    "quailora_show_progress": "show_progress", "quailora_report_svd_baseline": "report_svd_baseline",
}


TRAINING_ONLY_OPTIONS = ("sweep_tasks", "sweep_ranks", "sweep_limit", "export_ranks")


def check_recipe_arguments(model_args: RecipeModelConfig, recipe_args: RecipeArguments, trains: bool = True) -> None:
    """The checks every recipe shares, before anything loads.

    Args:
        model_args (`RecipeModelConfig`), recipe_args (`RecipeArguments`): the parsed arguments.
        trains (`bool`, defaults to `True`): `False` for a recipe that does not train (`quailora_init.py`): then the
            sweep and export options, and `--quailora false`, are refused rather than ignored.

    Raises:
        ValueError: `--use_peft false`; QuAILoRA on a full-precision base; bad QuAILoRA options; training-only
            options given to a recipe that does not train.
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
    if recipe_args.quailora and model_args.quantization == "none":
        raise ValueError(
            "QuAILoRA corrects a quantization error: use a quantized base (`--load_in_4bit`, `--load_in_8bit`) or "
            "`--quailora false`."
        )
    if recipe_args.quailora:
        recipe_args.quailora_config()  # its own checks (solver, budget, placement)

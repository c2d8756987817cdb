"""`hf-quailora init`: a QuAILoRA start written as an ordinary peft adapter folder that any launcher can train from.

It takes the recipes' flags (trl's `ModelConfig` names, `QuAILoRAConfig`'s field names, `--calibration_dataset`),
loads the base quantized, runs the streamed `quailora_init` and writes, atomically (`hf_quailora.io.staged_folder`):

- `adapter_config.json`, `adapter_model.safetensors`: the adapter as peft writes it; its LoraConfig's
  `auto_mapping` carries `{"hf_quailora": {"quailora": true, "rank_scaling": "constant", ...}}`, so that a plain
  `PeftModel.from_pretrained` brings the facts back (`hf_quailora/_peft_utils.py` says why there);
- `dynamic_rank.json`: `quailora: true`, `rank_scaling: "constant"` (each truncation starts at its own optimum),
  the base `quantization`, and the `calibration` (data, samples, length, tokens, solver);
- `quailora_report.json`: the per-layer report of the init.

Then train it anywhere: `PeftModel.from_pretrained(base, folder, is_trainable=True)` and `DynamicRankTrainer`
(which resolves `rank_scaling="constant"` from the adapter), or a launcher's `adapter_name_or_path` /
`lora_model_dir`; `hf-quailora eval|export --adapter FOLDER` read the same metadata. See `docs/launchers.md`.

    hf-quailora init --output_dir outputs/start-r16 --lora_r 16
    hf-quailora init --model_name_or_path meta-llama/Llama-3.1-8B --load_in_4bit --lora_r 64 \\
        --calibration_samples 128 --calibration_length 512 --output_dir llama8b-quailora-r64

Example:

```python
from hf_quailora.scripts.init_adapter import main

main(["--output_dir", "outputs/start-r8", "--lora_r", "8", "--calibration_samples", "16"])
```
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io_utils import ADAPTER_CONFIG, check_not_a_file, staged_folder
from .._peft_utils import adapter_facts, common_lora_rank, record_adapter_facts, require_lora_layers
from ..dynamic_rank.model_card import write_adapter_card
from .args import RecipeArguments, RecipeModelConfig, RecipeQuAILoRAConfig, check_recipe_arguments
from .parser import RecipeParser


logger = logging.getLogger(__name__)

REPORT_FILE = "quailora_report.json"


@dataclass
class InitAdapterArguments:
    """`hf-quailora init`'s own settings: where the adapter goes.

    Parameters:
        output_dir (`str`): the adapter folder to write.
        overwrite (`bool`, defaults to `False`): replace an adapter already in `output_dir`.
        num_threads (`int`, *optional*): torch threads (default: torch's).
        trust_remote_code (`bool`, defaults to `False`): run the model's own code from the Hub.
    """

    output_dir: str = field(metadata={"help": "The adapter folder to write."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an adapter already in output_dir."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code from the Hub."})


def check_init_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise unless an initialised adapter may be written into `output_dir` (new, or `overwrite`).

    Raises:
        ValueError: `output_dir` is a file, or holds an adapter and `overwrite` is not set.
    """
    check_not_a_file(output_dir)
    if not overwrite and os.path.isfile(os.path.join(output_dir, ADAPTER_CONFIG)):
        raise ValueError(f"`output_dir` ({output_dir}) already holds an adapter; choose another folder or pass "
                         "--overwrite (overwrite=True) to replace it.")


def calibration_record(dataset: str, config, report, num_samples: int | None = None) -> dict:
    """The `calibration` entry of `dynamic_rank.json`: data, sequences, tokens and solver of a QuAILoRA init.

    Args:
        dataset (`str`): what the calibration text was (an embedded name, a file, a Hub id).
        config (`QuAILoRAConfig`): the settings `quailora_init` ran with.
        report (`QuAILoRAReport`): what it returned (the tokens it saw).
        num_samples (`int`, *optional*): the sequences actually used (default: `config.calibration_samples`).

    Example: `calibration_record("c4", config, report)` → `{"dataset": "c4", "samples": 32, ...}`.
    """
    record = {"dataset": str(dataset), "samples": num_samples if num_samples is not None else
              config.calibration_samples, "length": config.calibration_length, "tokens": int(report.num_tokens),
              "solver": config.solver, "damping": config.damping}
    if config.solver == "als":
        record["als_iterations"] = config.als_iterations
    return record


def save_quailora_start(model, output_dir: str | os.PathLike, calibration: dict | None = None, report=None,
                        adapter_name: str = "default") -> str:
    """Write a model that `quailora_init` initialised as a peft adapter folder with its QuAILoRA metadata.

    `dynamic_rank.json` records `quailora: true`, `rank_scaling: "constant"`, the ranks `1..r`, the base
    quantization and `calibration`; the same facts go into the LoraConfig (see the module docstring). The folder is
    written atomically: an interrupted save leaves nothing that loads as an adapter.

    Args:
        model (`PeftModel`): the model after `quailora_init`.
        output_dir (`str`): the adapter folder.
        calibration (`dict`, *optional*): what `calibration_record` returns.
        report (`QuAILoRAReport`, *optional*): written as `quailora_report.json` beside the adapter.
        adapter_name (`str`, defaults to `"default"`).

    Returns:
        `str`: `output_dir`.

    Raises:
        ValueError: the model was not initialised by `quailora_init`, or has no LoRA layers.

    Example:

    ```python
    report = quailora_init(model, texts, config, tokenizer=tokenizer)
    save_quailora_start(model, "outputs/start", calibration_record("c4", config, report), report)
    ```
    """
    from ..dynamic_rank.spec import QUAILORA_RANK_SCALING, DynamicRankMetadata

    if not adapter_facts(model, adapter_name).get("quailora"):
        raise ValueError(f"Adapter {adapter_name!r} was not initialised by quailora_init; run quailora_init(model, "
                         "...) first (a QLoRA start needs no folder of its own).")
    lora_r = common_lora_rank(require_lora_layers(model, adapter_name), adapter_name)
    record_adapter_facts(model, adapter_name, rank_scaling=QUAILORA_RANK_SCALING, min_rank=1, max_rank=lora_r)
    metadata = DynamicRankMetadata.for_model(model, adapter_name, max_rank=lora_r, min_rank=1,
                                             rank_scaling=QUAILORA_RANK_SCALING, calibration=calibration)
    with staged_folder(output_dir) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        if adapter_name != "default":  # peft writes other adapters into a subfolder of their name
            for entry in (tmp / adapter_name).iterdir():
                os.replace(entry, tmp / entry.name)
            (tmp / adapter_name).rmdir()
        metadata.save(tmp)
        write_adapter_card(tmp, metadata)  # how to load it, and why never on the full-precision base
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    return str(output_dir)


def init_adapter(init_args: InitAdapterArguments, model_args: RecipeModelConfig, recipe_args: RecipeArguments,
                 quailora_args: RecipeQuAILoRAConfig):
    """Check, load the base quantized with its LoRA, run `quailora_init`, write the folder; return `(model, report)`.

    Raises:
        ValueError: see `check_recipe_arguments` (e.g. a full-precision base) and `check_init_output_dir`, before
            anything loads.
    """
    from ..embedded import load_dataset_any
    from ..quailora import quailora_init
    from ..tokens import make_token_windows, tokenizer_adds_bos
    from .calibration import calibration_source
    from .models import load_recipe_model

    check_recipe_arguments(model_args, recipe_args, trains=False)
    check_init_output_dir(init_args.output_dir, init_args.overwrite)
    if init_args.num_threads:
        torch.set_num_threads(init_args.num_threads)
    source = calibration_source(recipe_args.calibration_dataset, trains=False)  # "auto": C4 (no training data)
    texts = load_dataset_any(source)["text"]  # before the model: fails fast
    model, tokenizer = load_recipe_model(model_args, trust_remote_code=init_args.trust_remote_code)
    windows = make_token_windows(tokenizer, texts, quailora_args.calibration_length, quailora_args.calibration_samples,
                                 add_bos=tokenizer_adds_bos(tokenizer))  # Gemma's windows start with BOS
    report = quailora_init(model, windows, quailora_args, tokenizer=tokenizer)
    calibration = calibration_record(source, quailora_args, report, int(windows.shape[0]))
    save_quailora_start(model, init_args.output_dir, calibration, report)
    return model, report


def make_parser() -> RecipeParser:
    """`hf-quailora init`'s flags: its own, trl's model and LoRA flags, the recipe options, the QuAILoRA settings."""
    return RecipeParser((InitAdapterArguments, RecipeModelConfig, RecipeArguments, RecipeQuAILoRAConfig),
                        prog="hf-quailora init", description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (`--config FILE.yaml` works too), initialise and write the adapter; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_args, model_args, recipe_args, quailora_args = make_parser().parse_args_and_config(argv)
    _, report = init_adapter(init_args, model_args, recipe_args, quailora_args)
    print(report.summary())
    print(f"QuAILoRA start written to {Path(init_args.output_dir)} (rank_scaling 'constant'); train it with "
          "PeftModel.from_pretrained(base, folder, is_trainable=True) or a launcher's adapter path.")
    return 0

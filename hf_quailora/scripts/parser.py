"""`RecipeParser`: trl's `TrlParser`, also taking the recipes' renamed flags through one table, with a FutureWarning.

The recipes parse each dataclass directly, so a flag is its field's name. Flags a recipe used to take under another
name (`--quailora_solver`, now `--solver`, the `QuAILoRAConfig` field) are renamed on the command line and in the
`--config` YAML before trl parses them.

Example:

```python
from hf_quailora.scripts import RecipeArguments, RecipeParser, RecipeQuAILoRAConfig

recipe_args, quailora_args = RecipeParser((RecipeArguments, RecipeQuAILoRAConfig)).parse_args_and_config(
    ["--quailora_solver", "als"]
)  # a FutureWarning: `--quailora_solver` is deprecated; use `--solver`
assert quailora_args.solver == "als"
```
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping

from trl import TrlParser


# The recipes' flags before they parsed `QuAILoRAConfig` itself: former flag -> field
RENAMED_FLAGS = {
    f"quailora_{name}": name for name in (
        "solver", "als_iterations", "damping", "streaming", "memory_budget", "gram_device", "gram_dtype",
        "solve_dtype", "show_progress", "report_svd_baseline",
    )
}


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"`--{old}` is deprecated; use `--{new}`.", FutureWarning, stacklevel=stacklevel + 1)


def rename_flags(argv: Iterable[str], renamed: Mapping[str, str]) -> list[str]:
    """`argv` with each former flag (`--rank`, `--rank=8`) replaced by its new name (`--lora_r`), with a FutureWarning.

    Example:

    ```python
    rename_flags(["--rank", "8"], {"rank": "lora_r"})  # ["--lora_r", "8"], and a FutureWarning
    ```
    """
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        old = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if old in renamed:
            _warn(old, renamed[old], stacklevel=3)  # the caller of RecipeParser.parse_args_and_config
            arg = f"--{renamed[old]}{sep}{value}"
        out.append(arg)
    return out


def rename_config_keys(config: Mapping, renamed: Mapping[str, str]) -> dict:
    """The `--config` YAML's keys with each former flag replaced by its new name, with a FutureWarning.

    Raises:
        ValueError: a former flag and its new name are both keys.
    """
    out = dict(config)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ValueError(f"The config file gives both `{old}` and `{new}`; `{old}` is the former name of "
                                 f"`{new}`: keep `{new}` only.")
            _warn(old, new, stacklevel=5)  # the caller of RecipeParser.parse_args_and_config
            out[new] = out.pop(old)
    return out


class RecipeParser(TrlParser):
    """trl's `TrlParser` that takes the former flags of `renamed_flags` on the command line and in `--config` files.

    Args:
        dataclass_types: the dataclasses to parse, as for `TrlParser`.
        renamed_flags (`Mapping[str, str]`, defaults to `RENAMED_FLAGS`): former flag -> field, without dashes.
        **kwargs: passed to `TrlParser`.

    Example:

    ```python
    parser = RecipeParser((RecipeArguments, RecipeQuAILoRAConfig), renamed_flags={**RENAMED_FLAGS, "rank": "lora_r"})
    ```
    """

    def __init__(self, dataclass_types, renamed_flags: Mapping[str, str] = RENAMED_FLAGS, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.renamed_flags = dict(renamed_flags)

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs):
        """`TrlParser.parse_args_and_config`, after renaming the former flags of the command line."""
        args = rename_flags(sys.argv[1:] if args is None else args, self.renamed_flags)
        return super().parse_args_and_config(args, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """`TrlParser.set_defaults_with_config`, after renaming the former flags among the YAML's keys."""
        return super().set_defaults_with_config(**rename_config_keys(kwargs, self.renamed_flags))

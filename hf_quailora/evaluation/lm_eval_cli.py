"""`hf-quailora lm-eval ...`: lm-eval's own command line, with `hf-dynrank` registered and the offline tasks found.

lm-eval 0.4.13 knows only the models whose module was imported before its command line runs, so a bare
`lm_eval --model hf-dynrank ...` fails ("no model for this name found"). Newer lm-eval releases also discover models
through the `lm_eval.models` entry-point group, which hf_quailora declares; 0.4.13 ignores it. This command imports
the bridge (registering `hf-dynrank`), adds the folder of the offline tasks (`quailora_*`) to the task include path,
and hands every other argument to lm-eval's own parser, so every lm-eval flag works:

    hf-quailora lm-eval --model hf-dynrank \\
        --model_args pretrained=smollm2-135m,peft=outputs/alpaca/adapter,rank=4 \\
        --tasks quailora_wiki_ppl --limit 20 --device cpu --output_path outputs/lm_eval

Example (the same from Python):

```python
from hf_quailora.evaluation.lm_eval_cli import run_lm_eval_cli

run_lm_eval_cli(["--model", "hf-dynrank", "--model_args", "pretrained=smollm2-135m,peft=outputs/alpaca/adapter",
                 "--tasks", "quailora_wiki_ppl", "--limit", "20"])
```
"""

from __future__ import annotations

import os
import sys


def _from_config_file(args, key: str):
    """`key` of the YAML file given to `--config` (lm-eval's own reader), where the command line leaves it unset."""
    if not getattr(args, "config", None):
        return None
    from lm_eval.config.evaluate_config import EvaluatorConfig

    return EvaluatorConfig.load_yaml_config(args.config).get(key)


def _include_paths(args, offline_dir: str) -> list[str]:
    """The offline tasks' folder, then the user's `--include_path` (or the `include_path` of `--config`'s YAML)."""
    user = getattr(args, "include_path", None)
    if user is None:
        user = _from_config_file(args, "include_path")
    user = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
    for path in user:
        if not os.path.isdir(path):
            raise ValueError(f"`--include_path` {path!r} is not a folder; give a folder of task YAML files.")
    return [offline_dir, *(str(path) for path in user)]


def _check_model_name(args) -> None:
    """Raise, listing the names lm-eval knows, unless `--model` (or `--config`'s `model`) names a registered model;
    nothing is loaded."""
    from lm_eval.api.registry import model_registry

    name = getattr(args, "model", None) or _from_config_file(args, "model") or "hf"  # lm-eval's own default
    if name not in model_registry:
        known = ", ".join(sorted(model_registry.keys()))
        raise ValueError(
            f"`--model` {name!r} is not a model lm-eval knows. Known names: {known}. For a dynamic-rank adapter use "
            "`--model hf-dynrank --model_args pretrained=<base>,peft=<adapter>,rank=<b>`."
        )


def run_lm_eval_cli(argv: list[str]) -> int:
    """Run lm-eval's command line (`lm-eval run|ls|validate ...`, or the legacy form without a command) on `argv`.

    Args:
        argv (`list[str]`): lm-eval's arguments, e.g. `["--model", "hf-dynrank", "--model_args", "...", "--tasks",
            "quailora_wiki_ppl"]`.

    Returns:
        `int`: 0 once lm-eval has finished.

    Raises:
        ImportError: lm-eval is not installed (the message names `pip install 'hf_quailora[eval]'`).
        ValueError: `--model` (or `model` in the `--config` YAML) names no registered model, checked before any task
            index or model loads; an `--include_path` that is not a folder.
    """
    from . import require_lm_eval

    require_lm_eval("hf-quailora lm-eval")
    from lm_eval._cli.harness import HarnessCLI  # what lm-eval's `cli_evaluate` runs, minus its own sys.argv read
    from lm_eval.utils import setup_logging

    from . import lm_eval_bridge  # noqa: F401 (registers "hf-dynrank")
    from .tasks import write_offline_tasks

    setup_logging()
    harness = HarnessCLI()
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv (and inserts `run` for the legacy form)
    try:
        args = harness.parse_args()
    finally:
        sys.argv = saved_argv
    if args.command == "run":
        _check_model_name(args)
    if hasattr(args, "include_path"):
        # lm-eval's TaskManager takes a list of folders; its command line offers one, so the list is set here.
        args.include_path = _include_paths(args, write_offline_tasks())
    harness.execute(args)
    return 0

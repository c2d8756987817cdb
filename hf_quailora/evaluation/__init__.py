"""Proof: per-rank evaluation with lm-evaluation-harness, held-out perplexity, reports and plots.

| module | holds |
|---|---|
| `lm_eval_bridge` | `evaluate_ranks`, the lm-eval model `hf-dynrank` (imports lm-eval; importing it registers the model) |
| `lm_eval_cli` | `hf-quailora lm-eval`: lm-eval's own command line with `hf-dynrank` registered and the offline tasks |
| `tasks/` | the offline task YAML files and `write_offline_tasks` |
| `perplexity` | `compute_perplexity` on token windows |
| `reporting` | result rows → JSON, Markdown, a PNG of each metric against rank |
| `sweep_callback` | `RankSweepCallback`: the lm-eval sweep during and after training |

This package's `__init__` imports nothing heavy: lm-eval loads only with `lm_eval_bridge`. lm-eval is the `eval`
extra (`pip install 'hf_quailora[eval]'`); without it, every lm-eval piece raises `require_lm_eval`'s `ImportError`.
"""

LM_EVAL_INSTALL = "pip install 'hf_quailora[eval]'"


def require_lm_eval(what: str = "This") -> None:
    """Raise an `ImportError` naming the `eval` extra unless lm-evaluation-harness can be imported.

    Args:
        what (`str`): the piece that needs it, for the message (e.g. `"hf-quailora lm-eval"`).

    Raises:
        ImportError: lm-eval is not installed (or fails to import; its own error is chained).

    Example: `require_lm_eval("evaluate_ranks")` → `ImportError: evaluate_ranks needs lm-evaluation-harness ...`.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{what} needs lm-evaluation-harness (lm-eval>=0.4.13,<0.5), which is not installed: run "
            f"`{LM_EVAL_INSTALL}`. Initialisation, training and export work without it."
        ) from err
    _warn_about_an_older_lm_eval()


def _warn_about_an_older_lm_eval() -> None:
    # axolotl 0.21 pins lm_eval==0.4.11, so an environment shared with it has an lm-eval this bridge was not tested on.
    import warnings
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("lm_eval")
    except PackageNotFoundError:
        return
    if Version(installed) < Version("0.4.13"):
        warnings.warn(f"lm-eval {installed} is installed; hf_quailora's lm-eval pieces are tested with >=0.4.13 "
                      "(axolotl pins 0.4.11: run `hf-quailora eval` in an environment of its own).", stacklevel=3)

"""lm-evaluation-harness bridge: benchmark every truncated rank of one dynamic-rank adapter.

- `evaluate_ranks(model, tokenizer, ranks, tasks)` runs lm-eval's `simple_evaluate` on the in-memory model at each
  rank (one `HFLM` per rank around the same loaded model, no request cache shared across ranks), restores the
  model's mode afterwards, and returns tidy rows (model × rank × task × metric, with stderr); with `output_dir` it
  writes JSON, Markdown and a PNG plot of each metric against rank.
- `DynamicRankLM`, registered in lm-eval as `"hf-dynrank"`, loads `pretrained=…,peft=…,rank=b` so lm-eval's own
  command line and Python API evaluate any rank of a saved adapter without exporting it first:

      hf-quailora lm-eval --model hf-dynrank --model_args pretrained=smollm2-135m,peft=outputs/adapter,rank=4 \\
          --tasks quailora_wiki_ppl

  (`import hf_quailora.evaluation.lm_eval_bridge` registers it; `hf-quailora lm-eval` is lm-eval's own command
  line with that import done and the offline tasks' folder included: see `lm_eval_cli.py`.)

Pattern after lm-eval's `hf_steered.py`: a context manager that restores state in `finally`, and an `HFLM` subclass
that overrides only `_model_call` / `_model_generate`.

Example:

```python
from hf_quailora import evaluate_ranks

rows = evaluate_ranks(model, tokenizer, ranks=[1, 2, 4, 8], tasks=["quailora_wiki_ppl"], limit=20,
                      output_dir="outputs/rank_sweep")
```
"""

from __future__ import annotations

from . import require_lm_eval  # first: without lm-eval, an ImportError that names the `eval` extra


require_lm_eval("hf_quailora's lm-eval bridge (evaluate_ranks, hf-dynrank, RankSweepCallback, hf-quailora eval)")

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence

import torch
from lm_eval import simple_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm.auto import tqdm

from .._import_utils import is_hub_offline
from ..dynamic_rank.exits import check_exits, find_depth_path, use_exit
from ..dynamic_rank.export import load_dynamic_rank_adapter
from ..dynamic_rank.saved_adapter import read_saved_adapter
from ..dynamic_rank.spec import METADATA_FILE, parse_ranks, resolve_rank_scaling
from ..dynamic_rank.truncation import TrainedRanks, use_rank
from ..quantization import prepare_for_exact_weights
from .lm_eval_options import RESULT_FILES, check_lm_eval_options, check_output_dir, results_to_rows  # noqa: F401
from .reporting import write_rank_report
from .tasks import OFFLINE_TASKS, write_offline_tasks


logger = logging.getLogger(__name__)



def resolve_tasks(
    tasks: str | Sequence[str], include_path: str | Sequence[str] | None = None
) -> tuple[list[str], TaskManager]:
    """Check task names before any model runs; returns `(names, TaskManager)`.

    hf_quailora's offline tasks (`quailora_*`) are always available. Other lm-eval tasks need their data from the
    Hub; with `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` set they are refused with a clear message.

    Raises:
        ValueError: an unknown task, or a Hub task while offline.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ValueError("Give at least one task, e.g. 'quailora_wiki_ppl'.")
    include = [include_path] if isinstance(include_path, str) else list(include_path or [])
    offline_dir = write_offline_tasks()
    if not include and all(name in OFFLINE_TASKS for name in names):
        # Only the shipped, self-contained YAMLs: indexing lm-eval's thousands of tasks takes seconds, this ~1 ms.
        return names, TaskManager(include_path=[offline_dir], include_defaults=False)
    manager = TaskManager(include_path=[offline_dir, *include])
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown}. Offline tasks shipped here: {list(OFFLINE_TASKS)}; lm-eval's own "
            "tasks (hellaswag, arc_easy, …) need the Hugging Face Hub for their data; your own task YAMLs need "
            "`include_path`."
        )
    if is_hub_offline():
        roots = [os.path.abspath(p) for p in [offline_dir, *include]]
        needs_hub = []
        for name in names:
            yaml_path = getattr(manager.task_index.get(name), "yaml_path", None)
            if yaml_path is None or not any(os.path.abspath(str(yaml_path)).startswith(r) for r in roots):
                needs_hub.append(name)
        if needs_hub:
            raise ValueError(
                f"Task(s) {needs_hub} load their data from the Hugging Face Hub, but HF_HUB_OFFLINE/"
                "HF_DATASETS_OFFLINE is set. Run with the Hub, or use the offline tasks "
                f"{list(OFFLINE_TASKS)} / your own YAMLs via `include_path`."
            )
    return names, manager


def _run_lm_eval(model, tokenizer, task_names, manager, batch_size, max_length, lm_eval_kwargs) -> dict:
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(
        model=lm, tasks=task_names, task_manager=manager, cache_requests=False, use_cache=None,
        log_samples=False, **lm_eval_kwargs,
    )
    if results is None:  # non-zero processes of a distributed run
        return {"results": {}}
    return results


def _check_baselines(baselines: dict | None) -> list[torch.nn.Module]:
    """Raise unless every baseline is `"no_adapter"` or a loaded model; return the loaded ones."""
    for name, baseline in (baselines or {}).items():
        if not (baseline == "no_adapter" or isinstance(baseline, torch.nn.Module)):
            raise TypeError(f"Baseline {name!r} must be 'no_adapter' or a loaded model, got {type(baseline).__name__}.")
    return [baseline for baseline in (baselines or {}).values() if isinstance(baseline, torch.nn.Module)]


def _evaluate_baselines(model, baselines: dict | None, run) -> list[dict]:
    """Rows of each baseline: `"no_adapter"` (this model with its adapter disabled) or another loaded model."""
    rows = []
    for name, baseline in (baselines or {}).items():
        no_adapter = isinstance(baseline, str)
        context, target = (model.disable_adapter(), model) if no_adapter else (contextlib.nullcontext(), baseline)
        with context:
            rows += results_to_rows(run(target), name, None)
    return rows


def evaluate_ranks(
    model: torch.nn.Module,
    tokenizer,
    ranks: str | Sequence[int],
    tasks: str | Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    baselines: dict | None = None,
    label: str = "dynamic-rank LoRA",
    rank_scaling: str | None = None,
    adapter_name: str = "default",
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    apply_chat_template: bool | str = False,
    bootstrap_iters: int = 1000,
    show_progress: bool = True,
    exits: Sequence[int] | None = None,
    **lm_eval_kwargs,
) -> list[dict]:
    """Evaluate one loaded dynamic-rank model on lm-eval tasks at every rank in `ranks`.

    Args:
        model (`PeftModel`): the model with a dynamic-rank LoRA adapter (loaded once, reused for every rank).
        tokenizer: its tokenizer; must have a pad token.
        ranks (`str` or `list[int]`): e.g. `"1,2,4,8"`; each within `1..r` and not above the trained `max_rank`
            recorded on the model.
        tasks (`str` or `list[str]`): lm-eval task names (offline: `quailora_wiki_ppl`, `quailora_alpaca_loss`,
            `quailora_alpaca_mc`, `quailora_wiki_cloze`; others need the Hub or `include_path`).
        include_path (*optional*): folder(s) of extra task YAMLs.
        output_dir (`str`, *optional*): write `results.json`, `results.md`, `results.png` there.
        overwrite (`bool`, defaults to `False`): allow replacing results in `output_dir`.
        baselines (`dict`, *optional*): label → `"no_adapter"` (this model with its adapter disabled) or another
            loaded model (e.g. a separately trained fixed-rank LoRA); evaluated once each, drawn as lines.
        label (`str`): the name of this model in tables and plots.
        rank_scaling (`str`, *optional*): the `rank_scaling` the adapter was trained with; defaults as in
            `use_rank` (the scaling recorded by the trainer or the adapter loader).
        adapter_name (`str`, defaults to `"default"`).
        batch_size, max_length, num_fewshot, limit, apply_chat_template, bootstrap_iters: lm-eval options.
        show_progress (`bool`, defaults to `True`): a progress bar over ranks.
        exits (`list[int]`, *optional*): SoFT by depth: evaluate every rank at each of these exits (`use_exit`, the
            first k layers); the rows of exit k are labelled `"{label} @ exit k"`, so the tables and the plot show
            one curve over ranks per exit.
        **lm_eval_kwargs: passed to `lm_eval.simple_evaluate` (e.g. `gen_kwargs`, `fewshot_as_multiturn`).

    Returns:
        `list[dict]`: rows `{model, rank, task, metric, value, stderr}` (baselines have `rank=None`).

    Raises:
        ValueError: a tokenizer without pad token, ranks out of range, a bad lm-eval option (`limit`,
            `batch_size`, ...), unknown tasks, an `output_dir` that is a file or already holds results; all checked
            before any model runs.

    Example:

    ```python
    rows = evaluate_ranks(model, tokenizer, "1,4,16", "quailora_wiki_ppl", limit=20, output_dir="outputs/sweep")
    ```
    """
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError(
            "The tokenizer has no pad token; lm-eval batches need one: `tokenizer.pad_token = tokenizer.eos_token`."
        )
    rank_list = parse_ranks(ranks)
    TrainedRanks.from_model(model, adapter_name).check(rank_list, "ranks")
    rank_scaling = resolve_rank_scaling(model, rank_scaling, adapter_name)
    if exits is not None:
        exits = check_exits(list(exits), find_depth_path(model).num_layers, "exits")
    check_lm_eval_options(limit, batch_size, max_length, num_fewshot)
    task_names, manager = resolve_tasks(tasks, include_path)
    check_output_dir(output_dir, overwrite)
    for target in [model, *_check_baselines(baselines)]:  # lm-eval runs no-grad eval passes; training may follow
        prepare_for_exact_weights(target)
    options = dict(num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
                   bootstrap_iters=bootstrap_iters, **lm_eval_kwargs)

    def run(target):
        return _run_lm_eval(target, tokenizer, task_names, manager, batch_size, max_length, options)

    was_training = model.training
    try:
        rows = _evaluate_baselines(model, baselines, run)
        for k in exits or [None]:
            at_exit = use_exit(model, k) if k is not None else contextlib.nullcontext()
            with at_exit:
                for b in tqdm(rank_list, desc="lm-eval over ranks", disable=not show_progress, unit="rank"):
                    # evaluation: no gradient flows, so the update rule does not matter
                    with use_rank(model, b, rank_scaling=rank_scaling, adapter_name=adapter_name,
                                  update_rule="frozen"):
                        rows += results_to_rows(run(model), label if k is None else f"{label} @ exit {k}", b)
    finally:
        model.train(was_training)
    if output_dir is not None and rows:
        paths = write_rank_report(rows, output_dir, title=f"{label}: {', '.join(task_names)}")
        logger.info("Rank sweep written to %s", ", ".join(paths.values()))
    return rows


def _parse_rank(rank) -> int | None:
    """`rank=` of `--model_args`: lm-eval passes `4` as an int and anything else as a string."""
    if rank is None or rank == "":
        return None
    if isinstance(rank, str) and rank.strip().isdigit():
        return int(rank)
    if isinstance(rank, int) and not isinstance(rank, bool):
        return rank
    raise ValueError(f"`rank` must be a whole number such as rank=4; got {rank!r}.")


def _parse_flag(name: str, value) -> bool:
    """A boolean model argument: `True`/`False`, or lm-eval's strings `true`/`false`/`1`/`0`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"`{name}` must be true or false, such as {name}=true; got {value!r}.")


@register_model("hf-dynrank")
class DynamicRankLM(HFLM):
    """lm-eval model `hf-dynrank`: a base model plus a saved dynamic-rank adapter, evaluated at rank `rank`.

    Args (as lm-eval `--model_args`):
        pretrained (`str`): base model: embedded name (`smollm2-135m`), folder or Hub id; or a loaded model.
        peft (`str`): the saved adapter folder (full rank; `dynamic_rank.json` beside it gives the scaling).
        rank (`int`, *optional*): the rank to evaluate (default: the largest trained rank, `max_rank` of
            `dynamic_rank.json`); ranks above it were never trained and are refused.
        quantization (`str`, *optional*): load the base in `none`, `nf4`, `fp4` or `int8`; defaults to the
            quantization recorded in `dynamic_rank.json` (the base the adapter was trained on), else `none`.
        rank_scaling (`str`, *optional*): override the scaling recorded in `dynamic_rank.json`.
        allow_other_base (`bool`, defaults to `False`): evaluate a QuAILoRA adapter on a base quantized otherwise
            than recorded (`allow_other_base=true`); refused without it (on the full-precision base its correction
            is applied twice).
        exit (`int`, *optional*): SoFT by depth: evaluate the first `exit` layers (`use_exit`); default: all.
        Other arguments go to `HFLM` (`batch_size`, `max_length`, …).

    An adapter without `dynamic_rank.json` is not known to be dynamic-rank: it is evaluated at its own rank only,
    with a warning.

    Example:

    ```python
    from lm_eval import simple_evaluate
    import hf_quailora.evaluation.lm_eval_bridge  # registers "hf-dynrank"

    simple_evaluate(model="hf-dynrank", model_args="pretrained=smollm2-135m,peft=outputs/adapter,rank=4",
                    tasks=["quailora_wiki_ppl"], task_manager=TaskManager(include_path=write_offline_tasks()))
    ```
    """

    def __init__(
        self,
        pretrained,
        peft: str | None = None,
        rank: int | str | None = None,
        quantization: str | None = None,
        rank_scaling: str | None = None,
        adapter_name: str = "default",
        allow_other_base: bool | str = False,
        exit: int | str | None = None,
        **kwargs,
    ):
        if peft is None:
            raise ValueError("hf-dynrank needs `peft=<adapter folder>`; for a plain model use lm-eval's `hf` model.")
        rank = _parse_rank(rank)
        batch_size = kwargs.get("batch_size")
        check_lm_eval_options(batch_size=1 if batch_size is None else batch_size, max_length=kwargs.get("max_length"))
        saved = read_saved_adapter(peft)  # checked before the base model loads
        if saved.metadata is None:
            if rank is not None and rank != saved.lora_rank:
                warnings.warn(
                    f"{peft} has no {METADATA_FILE}: it is not a dynamic-rank adapter, so it is evaluated at "
                    f"its own rank {saved.lora_rank}, not {rank}.",
                    stacklevel=2,
                )
            rank = saved.lora_rank
        trained = TrainedRanks.from_saved(saved)
        rank = trained.max_rank if rank is None else rank
        trained.check([rank], "rank")
        loaded = load_dynamic_rank_adapter(pretrained, saved, quantization, rank_scaling, adapter_name,
                                           tokenizer=kwargs.pop("tokenizer", None),
                                           allow_other_base=_parse_flag("allow_other_base", allow_other_base))
        self.dynamic_rank, self.dynamic_exit = rank, _parse_rank(exit)
        if self.dynamic_exit is not None:
            check_exits([self.dynamic_exit], find_depth_path(loaded.model).num_layers, "exit")
        self.rank_scaling = loaded.rank_scaling
        self.adapter_name = adapter_name
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Build from lm-eval's `--model_args` string, keeping `quantization=none` as the string `"none"`.

        lm-eval turns the value `none` into Python `None`, which here means "the quantization recorded with the
        adapter": without this, `quantization=none` would silently evaluate an NF4-trained adapter on an NF4 base.
        """
        items = (arg_string or "").split(",")
        pairs = [item.partition("=") for item in items]
        if any(key.strip() == "quantization" and value.strip().lower() == "none" for key, _, value in pairs):
            arg_string = ",".join(i for i in items if i.partition("=")[0].strip() != "quantization")
            additional_config = {**(additional_config or {}), "quantization": "none"}
        return super().create_from_arg_string(arg_string, additional_config)

    def _at_rank(self):
        stack = contextlib.ExitStack()
        if self.dynamic_exit is not None:
            stack.enter_context(use_exit(self._model, self.dynamic_exit))
        stack.enter_context(use_rank(self._model, self.dynamic_rank, rank_scaling=self.rank_scaling,
                                     adapter_name=self.adapter_name, update_rule="frozen"))  # evaluation only
        return stack

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._at_rank():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._at_rank():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

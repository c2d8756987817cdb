"""Calibration: batches from many input kinds, and padding-masked Gram matrices `H = XᵀX` from forward hooks.

Layers that read the same input tensor (q/k/v of attention; gate/up of an MLP) share one Gram matrix: the hook
recognises the shared tensor object and accumulates it once. Accumulation runs in float32 (or float64) without
holding activations; under `torch.distributed` the matrices and token counts are all-reduced, so every process
ends with the same `H`.

Example:

```python
batches = make_calibration_batches(c4_texts, tokenizer, num_samples=32, max_length=256)
grams = collect_gram_matrices(model, batches, {"q": model.layers[0].q_proj, ...})
```
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .._dist_utils import is_distributed, naming_collective
from ..tokens import check_token_ids
from .placement import add_gram, add_gram_by_blocks, float_rows


logger = logging.getLogger(__name__)


@dataclass
class GramStatistics:
    """Gram matrices of the inputs of a set of layers.

    Attributes:
        matrices (`dict[str, torch.Tensor]`): one `H = XᵀX` (summed, not averaged) per *group leader*.
        groups (`dict[str, str]`): layer name → name of the leader whose matrix it shares.
        num_tokens (`int`): non-padding tokens seen (summed over processes).
    """

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    num_tokens: int = 0

    def for_layer(self, name: str) -> torch.Tensor:
        """The Gram matrix that layer `name` sees."""
        return self.matrices[self.groups[name]]


def _tokenize(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise ValueError("Calibration given as text needs a `tokenizer`.")
    if tokenizer.pad_token is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token`.")
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _batches_from_ids(ids: torch.Tensor, num_samples: int | None, batch_size: int) -> list[dict]:
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    ids = ids[:num_samples] if num_samples is not None else ids
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)
    ]


def _batches_from_texts(texts: list[str], tokenizer, num_samples, max_length: int, batch_size: int) -> list[dict]:
    texts = texts[:num_samples] if num_samples is not None else texts
    return [_tokenize(texts[i : i + batch_size], tokenizer, max_length) for i in range(0, len(texts), batch_size)]


def _batches_from_dataset(dataset, tokenizer, num_samples, max_length: int, batch_size: int) -> list[dict]:
    rows = dataset.select(range(min(num_samples, len(dataset)))) if num_samples else dataset
    if "text" in dataset.column_names and "input_ids" not in dataset.column_names:
        return _batches_from_texts(list(rows["text"]), tokenizer, None, max_length, batch_size)
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"A calibration dataset needs a 'text' or 'input_ids' column; it has {dataset.column_names}."
        )
    batches = []
    for start in range(0, len(rows), batch_size):
        seqs = [torch.as_tensor(x)[:max_length] for x in rows[start : start + batch_size]["input_ids"]]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _batches_from_iterable(batches: Iterable, num_samples: int | None) -> list[dict]:
    out, seen = [], 0
    for batch in batches:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("Each calibration batch must be a mapping with 'input_ids' (and 'attention_mask').")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if num_samples is not None and seen + ids.shape[0] > num_samples:
            ids = ids[: num_samples - seen]
            mask = mask[: num_samples - seen] if mask is not None else None
        out.append({"input_ids": ids, "attention_mask": mask if mask is not None else torch.ones_like(ids)})
        seen += ids.shape[0]
        if num_samples is not None and seen >= num_samples:
            break
    return out


def make_calibration_batches(
    calibration,
    tokenizer=None,
    num_samples: int | None = 128,
    max_length: int = 512,
    batch_size: int = 8,
    vocab_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration input into a list of `{"input_ids", "attention_mask"}` batches.

    Args:
        calibration: one of
            - a `torch.LongTensor` of token ids `(n, length)` (every token counts),
            - a list of strings, or a `datasets.Dataset` with a `"text"` column (tokenized with padding and
              truncation to `max_length`), or one with an `"input_ids"` column,
            - an iterable of batch dicts with `"input_ids"` and optionally `"attention_mask"` (a DataLoader).
        tokenizer: needed for text.
        num_samples (`int`, *optional*, defaults to 128): stop after this many sequences (`None`: all).
        max_length (`int`, defaults to 512): truncation length for text.
        batch_size (`int`, defaults to 8): sequences per batch (ignored for an iterable of batches).
        vocab_size (`int`, *optional*): the model's vocabulary size; token ids must lie below it.

    Returns:
        `list[dict[str, torch.Tensor]]`.

    Raises:
        ValueError: the calibration set is empty, or holds token ids that are negative or not below `vocab_size`.
        TypeError: an unsupported calibration type, or token ids that are not integers (e.g. a float tensor).

    Example:

    ```python
    batches = make_calibration_batches(["Some text.", "More text."], tokenizer, max_length=128)
    ```
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"`num_samples` ({num_samples}) must be at least 1 (or None for all).")
    if batch_size < 1:
        raise ValueError(f"`batch_size` ({batch_size}) must be at least 1.")
    if isinstance(calibration, torch.Tensor):
        batches = _batches_from_ids(calibration, num_samples, batch_size)
    elif isinstance(calibration, str):
        raise TypeError("Calibration must be a list of texts, not one string; wrap it in a list.")
    elif isinstance(calibration, list) and all(isinstance(t, str) for t in calibration):
        batches = _batches_from_texts(calibration, tokenizer, num_samples, max_length, batch_size)
    elif hasattr(calibration, "column_names"):  # datasets.Dataset
        batches = _batches_from_dataset(calibration, tokenizer, num_samples, max_length, batch_size)
    elif isinstance(calibration, Iterable):
        batches = _batches_from_iterable(calibration, num_samples)
    else:
        raise TypeError(
            "Unsupported calibration input of type "
            f"{type(calibration).__name__}; give token ids, a list of texts, a datasets.Dataset or batches."
        )
    for batch in batches:
        check_token_ids(batch["input_ids"], vocab_size, "calibration input_ids")
    if not batches or sum(int(b["input_ids"].numel()) for b in batches) == 0:
        raise ValueError("The calibration set is empty; give at least one non-empty sequence.")
    if sum(int(b["attention_mask"].sum()) for b in batches) == 0:
        raise ValueError("The calibration set yields no non-padding tokens (every attention_mask is 0).")
    return batches


def gram_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The positions whose activations count in `H`: the attention mask, or all-zero for a padding batch."""
    return batch.get("gram_mask", batch["attention_mask"])


def equalize_batch_counts(make_batches, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """`make_batches()` on every process, then as many batches on each as on the one with the most.

    A process with fewer batches repeats its last one with an all-zero `gram_mask` (*zero weight*): the forward runs,
    so a sharded model's collectives inside it (FSDP's all-gathers) meet their partners, but no activation enters
    `H` and no token is counted. Padding rather than dropping the surplus keeps every sequence: the summed Gram
    matrices, and so the factors, equal one process's on the same data. A failure of `make_batches` on any process
    raises on every process (all of them take part in the one all-reduce before any of them raises).

    Args:
        make_batches (`Callable[[], list[dict]]`): builds this process's batches (`make_calibration_batches`).
        device (`torch.device` or `str`, defaults to `"cpu"`): where the count is reduced (the model's device for nccl).

    Returns:
        `list[dict[str, torch.Tensor]]`, of the same length on every process.

    Raises:
        Whatever `make_batches` raised on this process; `RuntimeError` on the others.

    Example:

    ```python
    batches = equalize_batch_counts(lambda: make_calibration_batches(my_share, tokenizer, batch_size=1))
    ```
    """
    if not is_distributed():
        return make_batches()
    error, batches = None, []
    try:
        batches = make_batches()
    except Exception as exc:  # reported below, after every process has joined the all-reduce
        error = exc
    flags = torch.tensor([float(error is not None), float(len(batches))], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if flags[0].item():
        raise RuntimeError("Building the calibration batches failed on another process; see its error.")
    most = int(flags[1].item())
    if len(batches) < most:
        logger.info("Calibration: %d zero-weight batch(es) added on process %d to match %d batches on every process.",
                    most - len(batches), torch.distributed.get_rank(), most)
        last = batches[-1]
        padding = {**last, "gram_mask": torch.zeros_like(last["attention_mask"])}
        batches = batches + [padding] * (most - len(batches))
    return batches


class GramCollector:
    """Forward hooks that accumulate `XᵀX` per distinct input tensor, padding excluded."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], dtype: torch.dtype, device: torch.device | None = None):
        self.modules = dict(modules)
        self.dtype = dtype
        self.device = device  # where the matrices accumulate; None: where the activations are
        self.stats = GramStatistics()
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._warned_shape = False
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1).bool()
        self._seen.clear()

    def _make_hook(self, name: str):
        @torch.no_grad()
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            entry = self._seen.get(id(x))
            if entry is not None and entry[0]() is x:  # the same tensor object: shares the leader's H
                self.stats.groups.setdefault(name, entry[1])
                return
            leader = self.stats.groups.setdefault(name, name)
            self._seen[id(x)] = (weakref.ref(x), leader)
            rows = x.reshape(-1, x.shape[-1])
            mask = self.mask if self.mask is not None and rows.shape[0] == self.mask.numel() else None
            if mask is None and not self._warned_shape:
                logger.warning("Input of %s does not match the attention mask; using every position.", name)
                self._warned_shape = True
            # Per-batch products in the activations' precision (float32 at least), accumulated in self.dtype:
            # float64 matmuls cost twice as much and change nothing at this batch size. Masked and upcast by chunks.
            rows = float_rows(rows, mask)
            # `add_` casts element by element: no float64 copy of the product is made.
            device = self.device or rows.device
            total = self.stats.matrices.get(leader)
            if total is None:
                total = self.stats.matrices[leader] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype,
                                                                  device=device)
            with full_float32_matmul():  # to another device: by column blocks (quailora/placement.py)
                add_gram(total, rows) if device == rows.device else add_gram_by_blocks(total, rows)

        return hook


@contextlib.contextmanager
def full_float32_matmul():
    """float32 matmuls at full precision inside, whatever the caller chose: with TF32 (`tf32=True`, or
    `torch.set_float32_matmul_precision("high")`) a GPU would keep only 10 mantissa bits of every `XᵀX` product."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Accumulate Gram matrices in float32 or float64, not {dtype}.")


def finish_statistics(stats: GramStatistics, modules: Mapping[str, torch.nn.Module], num_tokens: int,
                      device: torch.device) -> GramStatistics:
    """Check that every module ran, sum matrices and token counts over processes, and check the result.

    Under `torch.distributed` every process must call this the same number of times, with the same `modules`.

    Raises:
        ValueError: a module never ran, no non-padding token was seen, or a matrix is not finite (naming it).
    """
    stats.num_tokens = num_tokens
    missing = [name for name in modules if name not in stats.groups]
    if missing:
        raise ValueError(f"These layers never ran during calibration: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if is_distributed():
        with naming_collective("the all-reduce of the QuAILoRA init's Gram matrices"):
            count = torch.tensor([num_tokens], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(count)
            stats.num_tokens = int(count.item())
            for name in sorted(stats.matrices):  # same order on every process
                matrix = stats.matrices[name]
                reduced = matrix.to(device)  # gloo/nccl reduce on the process's device
                torch.distributed.all_reduce(reduced)
                stats.matrices[name] = reduced.to(matrix.device)
    if stats.num_tokens == 0:
        raise ValueError("Calibration saw no non-padding tokens; check the attention masks of the calibration data.")
    for name, matrix in stats.matrices.items():
        if not torch.isfinite(matrix).all():
            raise ValueError(
                f"The Gram matrix of the input of {name} is not finite (inf/nan activations); "
                "use float32 compute or other calibration data."
            )
    return stats


def skip_logits(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> dict:
    """`{"logits_to_keep": 1}` when the model takes it and no calibrated module is in its output head, else `{}`.

    The full logits (tokens × vocabulary, e.g. 0.5 GB per batch of 2048 tokens for a 128k vocabulary in bf16) are
    the largest tensor of a calibration forward, and nothing reads them; the blocks' inputs do not change.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return {}
    head = base.get_output_embeddings() if accepts and hasattr(base, "get_output_embeddings") else None
    if head is None:
        return {}
    in_head = {id(module) for module in head.modules()}
    if any(id(module) in in_head for module in modules.values()):
        return {}
    return {"logits_to_keep": 1}


@torch.no_grad()
def collect_gram_matrices(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    modules: Mapping[str, torch.nn.Module],
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    device: torch.device | str | None = None,
) -> GramStatistics:
    """Run `model` over `batches` and accumulate the Gram matrix of each module's input.

    Args:
        model (`torch.nn.Module`): the model to run (its current mode is used; callers put it in eval mode).
        batches (`list[dict]`): from `make_calibration_batches`.
        modules (`Mapping[str, torch.nn.Module]`): named modules whose input `X` to record.
        dtype (`torch.dtype`, defaults to float32): accumulation dtype.
        show_progress (`bool`, defaults to `True`): a tqdm bar over batches.
        device (*optional*): where the matrices accumulate (e.g. `"cpu"`); defaults to each module's device.

    Returns:
        `GramStatistics`; under `torch.distributed` summed over all processes.

    Raises:
        ValueError: no non-padding tokens were seen, a module never ran, or a matrix is not finite (naming it).
    """
    check_dtype(dtype)
    model_device = next(model.parameters()).device
    collector = GramCollector(modules, dtype, torch.device(device) if device is not None else None)
    extra = skip_logits(model, modules)
    num_tokens = 0
    with collector:
        for batch in tqdm(batches, desc="QuAILoRA calibration", disable=not show_progress, unit="batch"):
            mask = gram_mask(batch)
            collector.start_batch(mask)
            model(input_ids=batch["input_ids"].to(model_device), attention_mask=batch["attention_mask"].to(model_device),
                  use_cache=False, **extra)
            num_tokens += int(mask.sum())
    return finish_statistics(collector.stats, modules, num_tokens, model_device)

"""Sub-models by depth (SoFT's own axis): the first k decoder layers, then the model's own final norm and LM head.

Method: SoFT, Sorted Fine-Tuning (Kavehzadeh et al., 2023, "Sorted LLaMA"): sub-model k is the first k layers
followed by the shared final norm and LM head; the step's loss is `Σ_k w_k · L_k` over the exits, from one forward
pass (docs/methods.md §4). With dynamic rank each exit runs at the step's rank; with `soft_ranks` the loss runs over
the rank × exit grid, the pair (b, k) weighted `soft_weights[b] · soft_exit_weights[k]`.

- `find_depth_path(model)`: where a family keeps its decoder layers, final norm and LM head (`DEPTH_PATHS`); an
  unknown family is refused, naming it and the modules found.
- `use_exit(model, k)`: runs any code on the first k layers (composes with `use_rank`).
- `exit_layers(fractions, num_layers)`: fractions of the depth as layer counts.
- `DepthExits`: the trainer's side (`DynamicRankMixin` holds one when `soft_exits` or `eval_exits` is set): the
  exit losses of a training step and `evaluate()` at every (exit, rank).

Example:

```python
from hf_quailora.dynamic_rank.exits import exit_layers, use_exit
from hf_quailora import use_rank

exits = exit_layers([0.25, 0.5, 0.75, 1.0], 30)  # [8, 15, 22, 30]
with use_exit(peft_model, 15), use_rank(peft_model, 4):
    loss = peft_model(**batch).loss  # the first 15 layers, final norm, LM head, at rank 4
```
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .._peft_utils import unwrap_model
from .exit_loss import exit_nll
from .spec import check_integer


# model_type → (the decoder layers' ModuleList, the modules between the last layer and the LM head, in order), as
# paths inside the `...ForCausalLM` model; a missing (None) module in the list is skipped (OPT's `project_out`).
_DECODER = ("model.layers", ("model.norm",))
DEPTH_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: _DECODER for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt_neox": ("gpt_neox.layers", ("gpt_neox.final_layer_norm",)),
    "opt": ("model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out")),
    "bloom": ("transformer.h", ("transformer.ln_f",)),
}
# Options whose loss is not the token NLL that the exits compute, or that a module swap would break
_EXCLUSIVE = {"torch_compile": False, "use_liger_kernel": False, "label_smoothing_factor": 0.0, "loss_type": "nll"}


def _causal_lm(model: nn.Module) -> nn.Module:
    """The `...ForCausalLM` model inside DDP and peft wrappers."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


@dataclass
class DepthPath:
    """Where one model keeps its depth: the decoder layers, the output modules after them, the head and soft-cap.

    Attributes:
        model_type (`str`): the config's `model_type`.
        parent (`nn.Module`), attribute (`str`): `getattr(parent, attribute)` is the layers' `nn.ModuleList`.
        num_layers (`int`): the model's depth L.
        outputs (`list[nn.Module]`): the final norm (and OPT's `project_out`), applied in order.
        head (`nn.Module`): the LM head (`get_output_embeddings()`).
        softcap (`float`, *optional*): `final_logit_softcapping` (Gemma 2), else `None`.
        config: the model's (text) config.
    """

    model_type: str
    parent: nn.Module
    attribute: str
    num_layers: int
    outputs: list
    head: nn.Module
    softcap: float | None
    config: object

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attribute)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own output path from a layer's hidden state: final norm, LM head, soft-capping."""
        for module in self.outputs:
            hidden = module(hidden)
        logits = self.head(hidden)
        if self.softcap is not None:  # Gemma 2: cap · tanh(logits / cap), as its forward does
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def find_depth_path(model: nn.Module) -> DepthPath:
    """The decoder layers, final norm, LM head and soft-cap of `model` (a `PeftModel` or a `...ForCausalLM`).

    Args:
        model (`nn.Module`): a causal LM of a family in `DEPTH_PATHS`, bare or inside peft / DDP wrappers.

    Returns:
        `DepthPath`.

    Raises:
        ValueError: the family is not in `DEPTH_PATHS` (the message names it and the model's top modules and norms).

    Example: `find_depth_path(peft_model).num_layers` is 30 on SmolLM2-135M.
    """
    lm = _causal_lm(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    model_type = getattr(config, "model_type", type(lm).__name__)
    known = DEPTH_PATHS.get(model_type)
    layers = _get(lm, known[0]) if known else None
    if known is None or not isinstance(layers, nn.ModuleList):
        norms = [name for name, module in lm.named_modules()  # norm modules outside the numbered layers
                 if "norm" in type(module).__name__.lower() and not any(ch.isdigit() for ch in name)]
        raise ValueError(
            f"Depth exits are not supported on model family {model_type!r} ({type(lm).__name__}): its final norm is "
            f"not known. Top-level modules: {[name for name, _ in lm.named_children()]}; norms outside the layers: "
            f"{norms}. Supported families: {sorted(DEPTH_PATHS)}. Drop `soft_exits`/`eval_exits`/`exit`."
        )
    parent_path, attribute = known[0].rsplit(".", 1)
    outputs = [module for module in (_get(lm, path) for path in known[1]) if module is not None]
    return DepthPath(model_type, _get(lm, parent_path), attribute, len(layers), outputs, lm.get_output_embeddings(),
                     getattr(config, "final_logit_softcapping", None), config)


def check_exits(exits: Sequence[int], num_layers: int | None, name: str = "soft_exits") -> list[int]:
    """Raise unless `exits` is a non-empty list of distinct layer counts in `1..num_layers`; return them sorted.

    `num_layers=None` checks only that they are distinct integers ≥ 1 (a config, before the model is known).

    Raises:
        TypeError: an exit that is not an integer. ValueError: empty, repeated, 0 or below, or above the depth.
    """
    if exits is None or len(exits) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of layer counts; got {exits!r}.")
    for k in exits:
        check_integer(name, k)
        if k < 1:
            raise ValueError(f"`{name}` holds exit {k}: an exit is a number of layers, at least 1.")
        if num_layers is not None and k > num_layers:
            raise ValueError(f"`{name}` holds exit {k}, above the model's {num_layers} layers; use exits in "
                             f"1..{num_layers} (`exit_layers` turns fractions of the depth into counts).")
    if len(set(exits)) != len(exits):
        raise ValueError(f"`{name}` ({list(exits)}) repeats an exit; give each layer count once.")
    return sorted(exits)


def check_exits_against_config(config, exits: dict[str, Sequence[int] | None]) -> None:
    """Check `exits` (`{"flag name": layer counts or None}`) against a transformers `config` (its text config's
    `model_type` and `num_hidden_layers`), before any weight loads.

    Raises:
        ValueError: a family whose depth path is unknown, or an exit outside `1..num_hidden_layers`.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config.model_type not in DEPTH_PATHS:
        raise ValueError(f"Exits ({', '.join(exits)}) are not supported on model family {config.model_type!r}; "
                         f"supported: {sorted(DEPTH_PATHS)}.")
    for name, values in exits.items():
        if values:
            check_exits(values, config.num_hidden_layers, name)


def exit_layers(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Fractions of the depth as exits: `round(f · L)` (at least 1), sorted and without repeats.

    Args:
        fractions (`list[float]`): each in (0, 1].
        num_layers (`int`): the model's depth L.

    Returns:
        `list[int]`: the exits (layer counts).

    Raises:
        ValueError: a fraction outside (0, 1].

    Example: `exit_layers([0.25, 0.5, 0.75, 1], 18)` is `[4, 9, 14, 18]`.
    """
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"Exit fractions must lie in (0, 1]; got {f!r} in {list(fractions)}.")
    return sorted({max(1, int(math.floor(f * num_layers + 0.5))) for f in fractions})


@contextmanager
def use_exit(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """Run `model` on its first `k` decoder layers, followed by its own final norm and LM head (SoFT's sub-model k).

    The layers' `ModuleList` is replaced by one holding the first k layers (the same modules: parameters, optimizer
    state and LoRA layers are untouched) and the config's `num_hidden_layers` set to k, both restored on exit.
    Composes with `use_rank`, in either order.

    Args:
        model (`nn.Module`): a causal LM of a family in `DEPTH_PATHS` (bare or a `PeftModel`).
        k (`int`): the exit, `1 ≤ k ≤ L`.

    Raises:
        ValueError: an unknown family, or `k` outside `1..L`.

    Example:

    ```python
    with use_exit(model, 8):
        logits = model(**batch).logits  # the first 8 layers
    ```
    """
    depth = find_depth_path(model)
    check_exits([k], depth.num_layers, "exit")
    layers = depth.layers
    saved = depth.config.num_hidden_layers, getattr(depth.config, "layer_types", None)
    setattr(depth.parent, depth.attribute, nn.ModuleList(list(layers)[:k]))
    shallow_config(depth.config, k)
    try:
        yield model
    finally:
        setattr(depth.parent, depth.attribute, layers)
        depth.config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            depth.config.layer_types = saved[1]


def shallow_config(config, k: int):
    """Set `config` (its text config) to the first `k` layers: `num_hidden_layers = k` and, where the family lists
    one type per layer (Gemma 2/3, Qwen2/3, Mistral: `layer_types`), that list cut to its first `k` entries, so the
    config stays valid (transformers refuses to save one whose `layer_types` is longer than its depth).

    Args:
        config (`PretrainedConfig`): changed in place.
        k (`int`): the depth, at most the config's own.

    Returns:
        the same `config`.

    Example: `model, _ = load_quantized_model(path, config=shallow_config(AutoConfig.from_pretrained(path), 9))`
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.num_hidden_layers = k
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:k]
    return config


def check_exit_options(args) -> None:
    """Refuse the trainer options that `soft_exits` cannot combine with, naming them (before any model runs).

    Raises:
        ValueError: `torch_compile` (the exits swap modules and hook layers), `use_liger_kernel`, a
            `label_smoothing_factor` or a `loss_type` other than `"nll"` (the exits' loss is the token NLL).
    """
    clashes = [f"{name}={getattr(args, name)!r}" for name, plain in _EXCLUSIVE.items()
               if getattr(args, name, plain) not in (plain, None)]
    if clashes:
        raise ValueError(
            f"`soft_exits` cannot be combined with {', '.join(clashes)}: the exits' loss is the plain token NLL "
            f"from the model's own norm and LM head, on eagerly run layers. Drop `soft_exits` or reset "
            f"{', '.join(name.split('=')[0] for name in clashes)}."
        )


def _keep_hidden(store: dict, k: int):
    def hook(module, args, output):
        store[k] = output[0] if isinstance(output, tuple) else output  # BLOOM's blocks return tuples

    return hook


class DepthExits:
    """The depth side of `DynamicRankMixin`: the exit losses of each training step and `evaluate()` per exit.

    Training: the forward runs on the first `max(soft_exits)` layers (`use_exit`), whose output goes through the
    trainer's own loss (trl's, or the model's); forward hooks keep the hidden states after each smaller exit, and
    each exit's NLL (`exit_loss.exit_nll`: the model's norm, LM head and soft-cap, in checkpointed chunks) joins the loss with
    its weight, normalised as the trainer normalises its own (`num_items_in_batch`, else the valid tokens). So one
    backward serves every exit, under the step's rank, and gradient checkpointing and accumulation are unchanged.

    Args:
        trainer (`Trainer`): the trainer (its `model` and `args`).
        settings: `soft_exits`, `soft_exit_weights`, `eval_exits` (a `DynamicRankConfig` or `DynamicRankSettings`).

    Raises:
        ValueError: an unknown family, exits above the depth, or an option `soft_exits` cannot combine with.

    Example: `DepthExits(trainer, trainer.args).train_exits` is `[8, 15, 22, 30]` with those `soft_exits`.
    """

    def __init__(self, trainer, settings):
        self.depth = find_depth_path(trainer.model)
        num_layers = self.depth.num_layers
        exits = settings.soft_exits
        self.train_exits = check_exits(exits, num_layers) if exits else None
        weights = settings.soft_exit_weights or [1.0] * len(exits or [])
        self.weights = {k: float(w) for k, w in zip(exits or [], weights)}
        eval_exits = settings.eval_exits or exits
        self.eval_exits = check_exits(eval_exits, num_layers, "eval_exits") if eval_exits else []
        if exits:
            check_exit_options(trainer.args)
        self.trainer = trainer

    def compute_loss(self, compute, model, inputs, return_outputs, num_items_in_batch):
        """`Σ_k w_k · L_k` over `soft_exits` for one batch; `compute` is the trainer's own `compute_loss`."""
        labels = inputs.get("labels")
        if labels is None or "shift_labels" in inputs:
            raise ValueError("Depth exits need the batch's unshifted `labels` (no `shift_labels`: context or sequence "
                             "parallelism is not supported with `soft_exits`).")
        *lower, top = self.train_exits
        hidden = {}
        hooks = [self.depth.layers[k - 1].register_forward_hook(_keep_hidden(hidden, k)) for k in lower]
        try:
            with use_exit(model, top):
                result = compute(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        loss = (result[0] if return_outputs else result) * self.weights[top]
        if num_items_in_batch is None:
            denominator = (labels[:, 1:] != -100).sum().clamp(min=1)
        else:  # as trl and Trainer do: the batch's share of the accumulated tokens, DDP averaging the gradients
            processes = getattr(self.trainer.accelerator, "num_processes", 1)
            average = getattr(self.trainer.args, "average_tokens_across_devices", False)
            denominator = num_items_in_batch / (processes if average else 1)
        for k in lower:
            loss = loss + self.weights[k] * exit_nll(self.depth, hidden.pop(k), labels) / denominator
        return (loss, result[1]) if return_outputs else loss

    def evaluation_loop(self, per_rank_loop, loop_args, prefix: str):
        """`per_rank_loop` (the mixin's evaluation at every eval rank) under each exit below the depth, then at
        full depth, whose output it returns with `{prefix}_*@e{k}r{b}` added for every evaluated (exit, rank)."""
        per_exit = {}
        for k in self.eval_exits:
            if k < self.depth.num_layers:
                with use_exit(self.trainer.model, k):
                    per_exit[k] = per_rank_loop(*loop_args).metrics
        output = per_rank_loop(*loop_args)  # full depth last: the plain keys and trl's metrics stay the model's
        if self.depth.num_layers in self.eval_exits:
            per_exit[self.depth.num_layers] = output.metrics
        for k, metrics in sorted(per_exit.items()):
            for key, value in list(metrics.items()):
                name, at, rank = key.rpartition("@r")
                if at and key.startswith(f"{prefix}_") and rank.isdigit():
                    output.metrics[f"{name}@e{k}r{rank}"] = value
        return output


def check_exit_settings(soft_exits, soft_exit_weights, eval_exits) -> None:
    """The checks of the exit fields that need no model (`DynamicRankConfig`, `DynamicRankSettings`).

    Raises:
        TypeError / ValueError: an exit that is not an integer ≥ 1, a repeat, weights without exits, of the wrong
            length or not positive, naming the field.
    """
    if soft_exits is not None:
        check_exits(soft_exits, None, "soft_exits")
        weights = soft_exit_weights if soft_exit_weights is not None else [1.0] * len(soft_exits)
        if len(weights) != len(soft_exits):
            raise ValueError(f"`soft_exit_weights` has {len(weights)} entries but `soft_exits` has "
                             f"{len(soft_exits)}; give one weight per exit.")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"`soft_exit_weights` must hold positive finite numbers; got {w!r} in {weights}.")
    elif soft_exit_weights is not None:
        raise ValueError(f"`soft_exit_weights` ({soft_exit_weights}) needs `soft_exits`; set both or neither.")
    if eval_exits is not None:
        check_exits(eval_exits, None, "eval_exits")


def names_from_exit(model: nn.Module, k: int) -> list[str]:
    """The qualified module names (in `model`) of the decoder layers at index `k` and above: what an export of exit
    k leaves out. Raises as `use_exit` does."""
    depth = find_depth_path(model)
    check_exits([k], depth.num_layers, "exit")
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in list(depth.layers)[k:]]

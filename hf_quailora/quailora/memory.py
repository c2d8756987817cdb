"""The memory of QuAILoRA initialisation: the budget option, how blocks are grouped, and the formula of docs/memory.md,
term by term.

This module estimates and measures; `quailora/schedule.py` decides (the groups, the checks) from these numbers.

The peak *extra* memory of `quailora_init` (beyond the quantized model and its adapter) is

    Gram bytes of one group  +  (replay only) the cached hidden states  +  the factors solved so far
                             +  max(one layer's solve workspace, one calibration step)

- Gram bytes of a block: `Σ d_in² × b_gram` over the block's *distinct* layer inputs (q/k/v share one matrix,
  gate/up another); a Llama block has `(3·h² + i²) × b_gram` (hidden h, intermediate i; b_gram = 8 in float64,
  4 in float32, the default).
- One layer's solve workspace (closed form, solve dtype b_solve), the largest of its phases at the layer
  where that is largest (the down projection): forming `E = W − Q` (E, Q and W's float32 read: `2.5·out·in`);
  the Cholesky factorisation, written over the damped H cast from the Gram dtype (E and one in×in matrix:
  `out·in + in²`); the top-r SVD of `E·L` (E, L, E·L and the eigen-solver's `min(out, in)²` Gram matrix,
  eigenvectors and work: `2·out·in + in² + 3·min²`); the report's errors come after, when L is gone, with `E·H`
  formed `REPORT_CHUNK_ROWS` rows at a time (E, H in the solve dtype and one chunk: `out·in + in² +
  min(out, 1024)·in`, never the largest). Times b_solve. When the Gram matrices wait on the CPU and the solve runs
  on the GPU, the layer's H comes to the GPU in the Gram dtype beside it (`layer_gram`, `in² × b_gram`).
- The factors solved so far: every layer's `B` and `A` wait, in the adapter's dtype, until all layers are solved
  (a failure leaves the model untouched): `r × Σ (in + out) × b_adapter` at the end, one adapter's size.
- The hidden-state cache of replay: the current block's inputs for every calibration token, replaced batch by batch
  by its outputs, `tokens × h × b_act` (b_act: the compute dtype's bytes, e.g. 2 in bf16).
- One calibration step (one batch of `T_b = batch_size × max_length` tokens through one block, with the hooks;
  `QuAILoRAConfig`'s `calibration_batch_size` and `calibration_length`):
  the block's activations, about `T_b × (4·i + 6·h) × b_act`, with `attn_implementation="eager"` its scores and
  probabilities `2 × batch_size × heads × max_length² × b_act` (SDPA, transformers' default, does not hold them),
  and the hook's rows and product in at least float32,
  `(T_b·in + in²) × max(b_act, 4)` at the widest input (the rows are upcast and masked by chunks of
  `MASK_CHUNK_ROWS` rows, so no whole copy in the activations' dtype is made; with the Gram matrices on another
  device the product is formed by blocks of `GRAM_BLOCK_COLUMNS` columns: `in × 512`, not `in × in`). Solves and
  calibration steps never overlap, hence the max.
  The full logits (`T_b × vocab`) are not computed when the output head is not calibrated.

`estimate_init_memory` evaluates the formula for a transformers config; `bench/bench_init_scaling.py` checks it
against measured peaks.

Example:

```python
from transformers import AutoConfig
from hf_quailora.quailora.memory import estimate_init_memory

print(estimate_init_memory(AutoConfig.from_pretrained("meta-llama/Llama-3.1-8B"), num_samples=128, max_length=512))
```
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..quantization import bits_per_weight
from .solvers import REPORT_CHUNK_ROWS  # rows of E·H formed at once for the report's errors


GRAM_BLOCK_COLUMNS = 512  # columns of XᵀX formed at once when the Gram matrices live on another device
MASK_CHUNK_ROWS = 256  # rows of a batch's activations masked and upcast at once (quailora/placement.py)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_budget(value) -> int | None:
    """`"auto"` → None; an integer number of bytes, or a string such as `"8GiB"`, `"500MB"`, `"1e9"` → bytes.

    Raises:
        ValueError: zero, negative or non-finite budgets, and strings that are not a number with a unit.
        TypeError: anything that is neither a string nor a number.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"`memory_budget` must be 'auto', a number of bytes or a string like '8GiB'; got {value!r}.")
    number, unit = value, ""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+|[+-]?inf|nan)\s*([a-zA-Z]*)\s*", value, flags=re.I)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"`memory_budget` ({value!r}) must be 'auto', a number of bytes, or a number with a unit "
                f"({', '.join(unit for unit in _UNITS if unit)}), e.g. '8GiB'."
            )
        try:
            number = float(match.group(1))
        except ValueError as err:
            raise ValueError(f"`memory_budget` ({value!r}): {match.group(1)!r} is not a number.") from err
        unit = match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"`memory_budget` ({value!r}) must be a positive, finite number of bytes (or 'auto').")
    return int(number * _UNITS[unit])


def format_bytes(num_bytes: float) -> str:
    """`1.5 GiB`, `26.0 MiB`, … (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def free_memory(device: torch.device) -> int:
    """Free bytes on `device`: `torch.cuda.mem_get_info` on a GPU, the available system memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # Linux without psutil
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024


def group_blocks(block_bytes: list[int], budget: int) -> list[list[int]]:
    """Consecutive blocks in groups whose Gram bytes (`block_bytes`, an upper bound per block) fit in `budget`.

    The caller checks first that every block fits (`quailora.schedule` does, naming the block); a block larger than
    `budget` would get a group of its own.

    Example:

    ```python
    group_blocks([3, 3, 3], budget=6)  # [[0, 1], [2]]
    ```
    """
    groups, current, used = [], [], 0
    for index, size in enumerate(block_bytes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    groups.append(current)
    return groups


@dataclass
class InitMemory:
    """The formula's terms for one model, in bytes (see the module docstring)."""

    parameters: int
    model_4bit: int
    gram_all_blocks: int
    gram_per_block: int
    solve_workspace: int
    hidden_state_cache: int
    calibration_step: int
    pending_factors: int
    gram_product: int = 0  # part of calibration_step: one batch's in×in product at the widest input
    gram_product_blocked: int = 0  # the same formed by column blocks, when the Gram matrices are on the CPU
    layer_gram: int = 0  # the widest layer's H in the Gram dtype: on the GPU beside a GPU solve of CPU Gram matrices

    @property
    def streamed_peak(self) -> int:
        """Peak extra memory of the default (replay, one block at a time) initialisation."""
        return (self.gram_per_block + self.hidden_state_cache + self.pending_factors
                + max(self.solve_workspace, self.calibration_step))

    def placed_peak(self, solve_on_cpu: bool = False, gram_on_cpu: bool = False) -> int:
        """Peak extra memory on the model's device (replay) with the solves (`solve_device="cpu"`) and / or the Gram
        matrices (`gram_device="cpu"`) on the CPU: the solve's workspace and the pending factors, and / or the Gram
        matrices and the hidden-state cache, leave it; a Gram matrix on the CPU is formed by column blocks
        (`quailora/placement.py`)."""
        step = self.calibration_step - (self.gram_product - self.gram_product_blocked if gram_on_cpu else 0)
        # with gram_device="cpu" the hidden-state cache waits on the CPU too (one batch of it is in the step)
        resident = 0 if gram_on_cpu else self.gram_per_block + self.hidden_state_cache
        if solve_on_cpu:
            return resident + step
        # a GPU solve of a Gram matrix kept on the CPU brings that layer's H to the GPU first
        solve = self.solve_workspace + (self.layer_gram if gram_on_cpu else 0)
        return resident + self.pending_factors + max(solve, step)

    @property
    def all_at_once_peak(self) -> int:
        """Peak extra memory of `streaming="off"` (every Gram matrix alive at once)."""
        return self.gram_all_blocks + self.pending_factors + max(self.solve_workspace, self.calibration_step)


def _solve_workspace(out: int, inp: int) -> int:
    """Elements alive at the largest phase of one closed-form solve (see the module docstring)."""
    small = min(out, inp)
    return max(5 * out * inp // 2, out * inp + inp * inp, 2 * out * inp + inp * inp + 3 * small * small,
               out * inp + inp * inp + min(out, REPORT_CHUNK_ROWS) * inp)


def estimate_init_memory(config, num_samples: int = 128, max_length: int = 512, batch_size: int = 8,
                         gram_bytes: int = 4, solve_bytes: int = 8, activation_bytes: int = 2, rank: int = 16,
                         adapter_bytes: int = 4, eager_attention: bool = False) -> InitMemory:
    """The memory formula for a Llama-shaped transformers config (Llama, Qwen, Mistral, Gemma: q/k/v, o, gate/up,
    down in every block, LoRA on all of them).

    Args:
        config: a transformers `PretrainedConfig` (or anything with `hidden_size`, `intermediate_size`,
            `num_hidden_layers`, `num_attention_heads`, `vocab_size`; optional `num_key_value_heads`, `head_dim`).
        num_samples / max_length / batch_size (`int`, default 128 / 512 / 8): `QuAILoRAConfig`'s
            `calibration_samples` / `calibration_length` / `calibration_batch_size`.
        gram_bytes / solve_bytes (`int`, default 4 / 8): bytes per element of `gram_dtype` / `solve_dtype`.
        activation_bytes (`int`, defaults to 2): bytes per element of the compute dtype (bf16).
        rank (`int`, defaults to 16): the LoRA rank r.
        adapter_bytes (`int`, defaults to 4): bytes per element of the LoRA factors (peft keeps them in float32
            unless told otherwise).
        eager_attention (`bool`, defaults to `False`): the model runs `attn_implementation="eager"`, which holds
            every attention score and probability (SDPA, the default, does not).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (out, in) of q, k, v, o, gate, up, down
    block_params = sum(out * inp for out, inp in shapes)
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    per_block = (2 * h * h + q * q + i * i) * gram_bytes  # distinct inputs: h (q/k/v), q (o), h (gate/up), i (down)
    workspace = max(_solve_workspace(out, inp) for out, inp in shapes) * solve_bytes
    step_tokens, widest = min(batch_size, num_samples) * max_length, max(h, q, i)
    scores = 2 * min(batch_size, num_samples) * heads * max_length**2 if eager_attention else 0
    calibration_step = (
        (step_tokens * (4 * i + 6 * h) + scores) * activation_bytes
        + (step_tokens * widest + widest**2) * max(activation_bytes, 4)
    )
    return InitMemory(
        parameters=layers * block_params + embeddings,
        # NF4 as the bitsandbytes backend stores it (4.127 bits per block weight); embeddings and head stay in bf16
        model_4bit=int(layers * block_params * bits_per_weight("nf4") / 8) + embeddings * 2,
        gram_all_blocks=layers * per_block,
        gram_per_block=per_block,
        solve_workspace=workspace,
        hidden_state_cache=num_samples * max_length * h * activation_bytes,
        calibration_step=calibration_step,
        pending_factors=layers * rank * sum(out + inp for out, inp in shapes) * adapter_bytes,
        gram_product=widest**2 * max(activation_bytes, 4),
        gram_product_blocked=widest * min(widest, GRAM_BLOCK_COLUMNS) * max(activation_bytes, 4),
        layer_gram=widest**2 * gram_bytes,
    )

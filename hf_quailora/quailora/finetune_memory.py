"""The memory of QLoRA fine-tuning, the yardstick of QuAILoRA's promise "no extra fine-tuning memory": the peak of one
training step of a 4-bit model with LoRA, under gradient checkpointing, term by term (docs/memory.md).

QuAILoRA changes only the starting values of A and B, so its fine-tuning peak is QLoRA's; what it adds is the init,
which runs before the first step and whose peak (`quailora/memory.py`) should stay under this one.

The peak of a training step, in bytes (T = batch × length tokens, L blocks, P = the LoRA parameters):

    model_4bit + P × b_adapter                                  the NF4 model (quant state included), the factors
    + P × b_adapter                                             their gradients (alive from the backward to the step)
    + P × b_state                                               the optimizer's states
    + max( checkpoints + max(one block's recompute, the LM head),   during the backward
           P × b_step )                                         the optimizer step's temporaries

- `b_state`: 8 for AdamW in float32 (`exp_avg`, `exp_avg_sq`); 2 + 8/256 for bitsandbytes' (paged) 8-bit Adam
  (two uint8 states and a float32 absmax per 256-element block of each). `b_step`: the step's temporaries, 8 for
  torch's foreach AdamW (a denominator and an update per parameter), 0 for the 8-bit kernels.
- checkpoints: gradient checkpointing keeps each block's input, `L × T × h × b_act`.
- one block's recompute: during the backward one block at a time runs again with autograd and keeps what its
  backward needs. The per-layer activation model, counted on a Llama block with LoRA on every linear layer and
  `lora_dropout=0` (peft then skips the dropout): `T × (7·h + 6·q + 3·kv + 6·i) × b_act`, from
  - h: the block input, the attention norm's input and output, the residual, the MLP norm's input and output, and
    the gradient of the hidden state beside the one being formed (7);
  - q (= heads × head_dim): the query projection, its rotated copy, the keys and values repeated to every query head
    (2), the attention output and the output projection's contiguous input (6);
  - kv: the key and value projections and the rotated keys (3);
  - i: gate, up, SiLU(gate), their product, and the gradients of two of them while the MLP's backward runs (6);
  - plus `T × r` per LoRA layer (A's output, kept for B's gradient), `7 × T × r × b_act`;
  - with `attn_implementation="eager"`, the attention scores and probabilities, `2 × batch × heads × length² × b_act`.
  RMSNorm upcasts to float32 when b_act < 4: its two copies then cost 4 bytes, counted as `2 × T × h × (4 − b_act)`.
- the LM head: trl's `SFTTrainer` (1.x) and `DynamicRankTrainer` score tokens with trl's fused, chunked log-prob head,
  which never builds the `T × vocab` logits; it projects a tile of `min(T, 4096) × min(vocab, 32768)` at a time and
  keeps the float32 gradient of the last hidden state, `T × h × 4`. With Triton (CUDA, `lm_head="fused_triton"`) a
  kernel folds the tile in place: one tile in b_act. Without it (`"fused_torch"`, e.g. the CPU) torch folds it with
  whole-tile temporaries: the tile and, at the backward's peak, 8 float32 temporaries and a boolean mask
  (`trl/kernels/chunked_logprob.py`, `_backward_tile`: y, z, log p, p, the gradient, the target mask as float, its
  difference with p and its product), `tile × (b_act + 8 × 4 + 1)`. Unfused (`"logits"`, e.g. transformers'
  `Trainer` on a causal LM) the logits are whole: `T × vocab × (b_act + 3 × 4)` (the logits, their float32 upcast,
  `log_softmax` saved for the backward and its gradient).

`estimate_finetune_memory` evaluates it for a transformers config; `bench/bench_finetune_memory.py` checks it against
measured peaks (peak RSS, one fresh process per case) on the CPU.

Example:

```python
from transformers import AutoConfig
from hf_quailora.quailora.finetune_memory import estimate_finetune_memory

terms = estimate_finetune_memory(AutoConfig.from_pretrained("meta-llama/Llama-3.1-8B"), batch_size=1, max_length=2048)
print(terms.peak / 2**30, "GiB")
```
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import estimate_init_memory


# Bytes per LoRA parameter of the optimizer's states and of its step's temporaries
OPTIMIZER_BYTES = {
    "adamw_torch": (8.0, 8.0),
    "paged_adamw_8bit": (2.0 + 8 / 256, 0.0),
    "adamw_8bit": (2.0 + 8 / 256, 0.0),
}
# trl's fused log-prob head: tokens and vocabulary columns per tile (trl/kernels/chunked_logprob.py)
HEAD_TOKEN_TILE, HEAD_VOCAB_TILE = 4096, 32768
LM_HEADS = ("fused_triton", "fused_torch", "logits")


@dataclass
class FinetuneMemory:
    """The terms of one QLoRA training step's peak, in bytes (see the module docstring)."""

    model_4bit: int
    lora_parameters: int
    lora_gradients: int
    optimizer_states: int
    optimizer_step: int
    checkpoints: int
    block_recompute: int
    lm_head: int

    @property
    def activations(self) -> int:
        """The backward's peak: the checkpoints, and one block's recompute or the LM head, whichever is larger."""
        return self.checkpoints + max(self.block_recompute, self.lm_head)

    @property
    def training_extra(self) -> int:
        """What training adds to the loaded model with its adapter: gradients, states, activations (or the step)."""
        return self.lora_gradients + self.optimizer_states + max(self.activations, self.optimizer_step)

    @property
    def peak(self) -> int:
        """The whole step's peak: the NF4 model and the factors, plus `training_extra`."""
        return self.model_4bit + self.lora_parameters + self.training_extra


def _check(batch_size: int, max_length: int, rank: int, optimizer: str, activation_bytes: int, lm_head: str) -> None:
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` ({value!r}) must be a positive integer.")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"`optimizer` ({optimizer!r}) must be one of {sorted(OPTIMIZER_BYTES)} (the Trainer's `optim`).")
    if lm_head not in LM_HEADS:
        raise ValueError(f"`lm_head` ({lm_head!r}) must be one of {LM_HEADS}.")
    if activation_bytes not in (2, 4):
        raise ValueError(f"`activation_bytes` ({activation_bytes}) must be 2 (bf16/fp16 compute) or 4 (float32).")


def estimate_finetune_memory(config, batch_size: int = 1, max_length: int = 2048, rank: int = 16,
                             optimizer: str = "paged_adamw_8bit", activation_bytes: int = 2, adapter_bytes: int = 4,
                             lm_head: str = "fused_triton", eager_attention: bool = False) -> FinetuneMemory:
    """The peak memory of a QLoRA training step (NF4 base, LoRA on every linear layer of the blocks, gradient
    checkpointing) for a Llama-shaped transformers config.

    Args:
        config: a transformers `PretrainedConfig` (or anything with `hidden_size`, `intermediate_size`,
            `num_hidden_layers`, `num_attention_heads`, `vocab_size`; optional `num_key_value_heads`, `head_dim`,
            `tie_word_embeddings`).
        batch_size / max_length (`int`, default 1 / 2048): sequences per device step and tokens per sequence.
        rank (`int`, defaults to 16): the LoRA rank r.
        optimizer (`str`, defaults to `"paged_adamw_8bit"`, QLoRA's): `"adamw_torch"`, `"adamw_8bit"` or
            `"paged_adamw_8bit"`, as the Trainer's `optim`.
        activation_bytes (`int`, defaults to 2): bytes of the compute dtype (2 for bf16, 4 for float32).
        adapter_bytes (`int`, defaults to 4): bytes of the LoRA factors and their gradients (peft: float32).
        lm_head (`str`, defaults to `"fused_triton"`): how the trainer scores tokens: trl's fused, chunked head
            (SFTTrainer and DynamicRankTrainer) with its Triton kernel (CUDA) or its torch fallback (`"fused_torch"`,
            the CPU), or whole logits (`"logits"`).
        eager_attention (`bool`, defaults to `False`): `attn_implementation="eager"` keeps the attention scores.

    Returns:
        `FinetuneMemory`: the terms; `.peak` is the step's peak, `.training_extra` what training adds to the loaded
        model and adapter.

    Raises:
        ValueError: a non-positive size, an unknown optimizer, LM head or activation width.

    Example:

    ```python
    estimate_finetune_memory(config, batch_size=4, max_length=512, optimizer="adamw_torch").peak
    ```
    """
    _check(batch_size, max_length, rank, optimizer, activation_bytes, lm_head)
    init = estimate_init_memory(config, rank=rank, adapter_bytes=adapter_bytes)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    tokens, vocab = batch_size * max_length, config.vocab_size
    lora = init.pending_factors // adapter_bytes  # r × Σ (in + out) over every LoRA layer
    state_bytes, step_bytes = OPTIMIZER_BYTES[optimizer]
    block = tokens * (7 * h + 6 * q + 3 * kv + 6 * i + 7 * rank) * activation_bytes
    block += 2 * tokens * h * (4 - activation_bytes)  # RMSNorm's float32 copies
    if eager_attention:
        block += 2 * batch_size * heads * max_length**2 * activation_bytes
    tile = min(tokens, HEAD_TOKEN_TILE) * min(vocab, HEAD_VOCAB_TILE)
    if lm_head == "fused_triton":
        head = tile * activation_bytes + tokens * h * 4
    elif lm_head == "fused_torch":
        head = tile * (activation_bytes + 8 * 4 + 1) + tokens * h * 4
    else:
        head = tokens * vocab * (activation_bytes + 3 * 4)
    return FinetuneMemory(
        model_4bit=init.model_4bit,
        lora_parameters=lora * adapter_bytes,
        lora_gradients=lora * adapter_bytes,
        optimizer_states=int(lora * state_bytes),
        optimizer_step=int(lora * step_bytes),
        checkpoints=layers * tokens * h * activation_bytes,
        block_recompute=block,
        lm_head=head,
    )

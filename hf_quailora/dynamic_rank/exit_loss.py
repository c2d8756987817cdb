"""The loss of one depth exit (SoFT by depth, `exits.py`): the token NLL of `head(norm(h_k))`, chunked.

`exit_nll` keeps at most one chunk of vocabulary-sized logits alive (vocabularies reach 262k tokens). With a frozen
LM head (the usual LoRA case) `_HeadNLL` computes the gradient with respect to its input in the forward pass, so the
head runs twice per exit; otherwise each chunk is checkpointed (the head runs three times).

Example: `exit_nll(find_depth_path(model), hidden_after_layer_k, labels)` is a 0-dim float32 tensor (a sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


EXIT_CHUNK_TOKENS = 1024  # tokens per exit-logits chunk: at most this many rows of vocabulary-sized logits at once
FUSED_HEAD = True  # False: always the checkpointed chunks (bench/bench_soft_depth.py compares the two)


class _HeadNLL(torch.autograd.Function):
    """Σ of the token NLL of `head(x)` (soft-capped), with `∂/∂x` computed in the forward, chunk by chunk: the head
    runs twice per exit (logits, then the gradient's product with W) instead of three times (forward, recomputation,
    backward), and at most one chunk of vocabulary-sized logits is alive. Only for a frozen head."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, softcap):
        total, grad = x.new_zeros((), dtype=torch.float32), torch.empty_like(x)
        for start in range(0, labels.numel(), EXIT_CHUNK_TOKENS):
            y = labels[start : start + EXIT_CHUNK_TOKENS]
            logits = F.linear(x[start : start + EXIT_CHUNK_TOKENS], weight, bias).float()
            capped = None
            if softcap is not None:  # z = c · tanh(logits / c), ∂z/∂logits = 1 − tanh²
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            target = logits.gather(1, y[:, None]).squeeze(1)
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - target).sum()
            probs = logits.sub_(log_z[:, None]).exp_()  # ∂NLL/∂z = softmax(z) − onehot(y), in place
            probs[torch.arange(y.numel(), device=y.device), y] -= 1
            if capped is not None:
                probs.mul_(1 - capped * capped)
            grad[start : start + EXIT_CHUNK_TOKENS] = (probs.to(weight.dtype) @ weight).to(x.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def exit_nll(depth, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ of the token NLL of one exit, in chunks of `EXIT_CHUNK_TOKENS` tokens: at most one chunk's
    vocabulary-sized logits are alive. A frozen head (the usual LoRA case) goes through `_HeadNLL`; a trainable one
    through chunks whose logits are recomputed in backward.

    Args:
        depth (`exits.DepthPath`): the model's output modules (`outputs`), `head` and `softcap`.
        hidden (`torch.Tensor`): the hidden state after the exit's last layer, `(batch, seq, hidden)`.
        labels (`torch.Tensor`): the batch's unshifted labels, `-100` where not scored.

    Returns:
        `torch.Tensor`: the summed NLL (0-dim, float32), to be divided by the token count.

    Example: `exit_nll(find_depth_path(model), hidden, batch["labels"]) / num_tokens`.
    """

    def chunk_nll(h, y):
        return F.cross_entropy(depth.logits(h).float(), y, ignore_index=-100, reduction="sum")

    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))  # position t predicts token t + 1
    labels = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = labels != -100
    hidden, labels = hidden[keep], labels[keep]
    total = hidden.sum() * 0.0  # connected to the graph even when no token counts
    head = depth.head
    frozen = isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())
    if FUSED_HEAD and frozen and labels.numel():
        for module in depth.outputs:  # the final norm (and OPT's project_out), through autograd
            hidden = module(hidden)
        return total + _HeadNLL.apply(hidden, head.weight, head.bias, labels, depth.softcap)
    for start in range(0, labels.numel(), EXIT_CHUNK_TOKENS):
        end = start + EXIT_CHUNK_TOKENS
        total = total + checkpoint(chunk_nll, hidden[start:end], labels[start:end], use_reentrant=False)
    return total

"""Held-out perplexity of a causal LM on token windows (the metric QuAILoRA is judged by).

Example:

```python
windows = make_token_windows(tokenizer, load_dataset_any("wiki")["text"], 256, num_windows=32)
print(compute_perplexity(model, windows))
```
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..quantization import prepare_for_exact_weights
from ..tokens import check_token_ids


@torch.no_grad()
def compute_perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, show_progress: bool = False
) -> float:
    """Token-weighted perplexity of `model` over `windows` (every token but each window's first is predicted).

    The model's train/eval mode is restored afterwards; bitsandbytes' CPU fast path is turned off first, so the
    model can keep training after this call.

    Args:
        model (`torch.nn.Module`): a causal LM returning `.logits`.
        windows (`torch.LongTensor`): `(n, length)` token ids, e.g. from `make_token_windows`.
        batch_size (`int`, defaults to 8): windows per forward pass.
        show_progress (`bool`, defaults to `False`): a tqdm bar.

    Returns:
        `float`: `exp(mean negative log-likelihood)`.
    """
    check_token_ids(windows, getattr(model.get_input_embeddings(), "num_embeddings", None), "windows")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"`windows` must be (n, length ≥ 2) token ids; got shape {tuple(windows.shape)}.")
    prepare_for_exact_weights(model)  # a no-grad eval pass; the model may train afterwards
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), disable=not show_progress, desc="perplexity"):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)

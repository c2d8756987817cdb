"""Accuracy beside perplexity: the offline lm-eval task `quailora_wiki_cloze` (a Wikipedia sentence's last word
among 4 choices, chance 25%) scored on an arm's model through the project's lm-eval bridge."""

from __future__ import annotations

import torch


CLOZE_TASK = "quailora_wiki_cloze"


def cloze_accuracy(model: torch.nn.Module, tokenizer, documents: int, batch_size: int = 8) -> float:
    """The `quailora_wiki_cloze` accuracy (`acc`) of `model` on the task's first `documents` documents.

    Runs lm-eval's `simple_evaluate` on the in-memory model (the bridge's `resolve_tasks` and `_run_lm_eval`, no
    request cache), then restores the model's train/eval mode so that training can go on.

    Args:
        model: the model (a `PeftModel` or a plain causal LM), on any device.
        tokenizer: its tokenizer, with a pad token.
        documents (`int`): how many documents to score (lm-eval's `limit`); the task has 500.
        batch_size (`int`, defaults to 8): sequences per forward.

    Returns:
        `float`: the fraction of documents whose true last word has the highest log-likelihood.

    Raises:
        ValueError: `documents` below 1.

    Example:

    ```python
    accuracy = cloze_accuracy(trainer.model, tokenizer, documents=100)
    ```
    """
    if isinstance(documents, bool) or not isinstance(documents, int) or documents < 1:
        raise ValueError(f"`documents` ({documents!r}) must be an integer of at least 1.")
    from hf_quailora.evaluation.lm_eval_bridge import _run_lm_eval, resolve_tasks
    from hf_quailora.quantization import prepare_for_exact_weights

    names, manager = resolve_tasks([CLOZE_TASK])
    prepare_for_exact_weights(model)
    was_training = model.training
    try:
        results = _run_lm_eval(model, tokenizer, names, manager, batch_size, None,
                               dict(limit=documents, bootstrap_iters=0))
    finally:
        model.train(was_training)
    return float(results["results"][CLOZE_TASK]["acc,none"])

"""Accuracy beside perplexity: the offline lm-eval task `quailora_wiki_cloze` (a Wikipedia sentence's last word
among 4 choices, chance 25%) scored on an arm's model through the project's lm-eval bridge."""

from __future__ import annotations

import torch


CLOZE_TASK = "quailora_wiki_cloze"


def cloze_accuracy(model: torch.nn.Module, tokenizer, documents: int, batch_size: int = 8) -> float:
    """The `quailora_wiki_cloze` accuracy (`acc`) of `model` on the task's first `documents` documents.

    Runs lm-eval's `evaluate` on the in-memory model wrapped in `HFLM` (the task from the bridge's
    `resolve_tasks`; no request cache, no stderr bootstrap), then restores the model's train/eval mode so that
    training can go on. `evaluate`, not `simple_evaluate`: the latter also gathers the environment's description,
    which costs more than scoring a few documents.

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
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from hf_quailora.evaluation.lm_eval_bridge import resolve_tasks
    from hf_quailora.quantization import prepare_for_exact_weights

    names, manager = resolve_tasks([CLOZE_TASK])
    prepare_for_exact_weights(model)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluate(lm, manager.load(names), limit=documents, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)
    return float(results["results"][CLOZE_TASK]["acc,none"])

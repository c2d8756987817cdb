"""Trainer-side metrics through the `evaluate` library, with the metric modules shipped in this package.

`evaluate.load("accuracy")` fetches its script from the Hub; these load by local path and work offline.

Example:

```python
from hf_quailora.evaluation.metrics import make_compute_metrics, preprocess_logits_for_metrics

trainer = DynamicRankTrainer(..., compute_metrics=make_compute_metrics(),
                             preprocess_logits_for_metrics=preprocess_logits_for_metrics)
trainer.evaluate()  # eval_token_accuracy@r1, eval_token_accuracy@r8, …
```
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


METRICS_DIR = Path(__file__).parent
LOCAL_METRICS = ("token_accuracy",)


def load_metric(name: str):
    """`evaluate.load` of a metric shipped here (`"token_accuracy"`), by local path."""
    import evaluate

    if name not in LOCAL_METRICS:
        raise ValueError(f"Unknown local metric {name!r}; shipped: {LOCAL_METRICS}.")
    return evaluate.load(str(METRICS_DIR / name))


def preprocess_logits_for_metrics(logits, labels):
    """Keep only the argmax token ids, so evaluation does not gather full-vocabulary logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def make_compute_metrics(ignore_index: int = -100):
    """A `compute_metrics(eval_pred)` for causal-LM Trainers: next-token accuracy on the labelled tokens.

    Use with `preprocess_logits_for_metrics`; predictions at position t are compared with labels at t + 1.
    """
    metric = load_metric("token_accuracy")

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.asarray(predictions)[:, :-1].reshape(-1)
        labels = np.asarray(labels)[:, 1:].reshape(-1)
        result = metric.compute(predictions=predictions, references=labels, ignore_index=ignore_index)
        return {"token_accuracy": result["token_accuracy"]}

    return compute_metrics

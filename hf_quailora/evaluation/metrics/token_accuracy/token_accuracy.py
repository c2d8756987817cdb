"""Token accuracy of a causal LM: the share of target tokens (labels != ignore_index) predicted by argmax.

Shipped inside hf_quailora and loaded by local path (`evaluate.load(<this folder>)`), because `evaluate.load` of a
Hub metric name needs the network.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "Fraction of target tokens whose argmax prediction equals the label; positions with ignore_index skipped."
_KWARGS = """
Args:
    predictions (`list[int]`): predicted token ids (already shifted to align with references).
    references (`list[int]`): label token ids; `ignore_index` marks positions to skip (prompt, padding).
    ignore_index (`int`, defaults to -100).
Returns:
    token_accuracy (`float`), num_tokens (`int`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        predictions, references = np.asarray(predictions), np.asarray(references)
        mask = references != ignore_index
        count = int(mask.sum())
        accuracy = float((predictions[mask] == references[mask]).mean()) if count else float("nan")
        return {"token_accuracy": accuracy, "num_tokens": count}

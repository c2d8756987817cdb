"""Helpers of the hf_quailora offline lm-eval tasks (copied beside the task YAML by hf_quailora.evaluation.tasks)."""


def process_response_loss(doc, results):
    loglikelihood, _ = results[0]
    text = doc["completion"]
    return {
        "word_perplexity": (loglikelihood, max(1, len(text.split()))),
        "bits_per_byte": (loglikelihood, max(1, len(text.encode("utf-8")))),
    }

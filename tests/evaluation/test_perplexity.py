"""Held-out perplexity refuses windows that are not token ids of the model's vocabulary."""

import pytest
import torch

from hf_quailora.evaluation.perplexity import compute_perplexity

from testing_utils import make_model


def test_perplexity_refuses_token_ids_beyond_the_vocabulary_or_not_integers(tiny_model_path):
    model, tokenizer = make_model(tiny_model_path)
    with pytest.raises(ValueError, match="`windows` holds token id"):
        compute_perplexity(model, torch.full((1, 8), len(tokenizer)))
    with pytest.raises(TypeError, match="`windows` must be integer token ids"):
        compute_perplexity(model, torch.ones(1, 8))

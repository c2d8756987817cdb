"""The family models, built on first use and kept for the session (`family_models.py` lists them)."""

import pytest

from .family_models import FAMILY_BY_NAME, build_family_model


@pytest.fixture(scope="session")
def family_path(tmp_path_factory, tiny_model_path):
    """`family_path(name)`: the folder of that family's tiny model, built on first use and kept for the session."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    built = {}

    def path(name: str) -> str:
        if name not in built:
            folder = tmp_path_factory.mktemp(f"family-{name}")
            build_family_model(FAMILY_BY_NAME[name], tokenizer, folder)
            built[name] = str(folder)
        return built[name]

    return path

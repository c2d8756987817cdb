"""Skip markers and small helpers shared by the tests."""

import importlib.util

import pytest
import torch


require_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"
)
require_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def snapshot(model: torch.nn.Module, only_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Copies of the (trainable) parameters, for before/after comparisons."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad or not only_trainable
    }


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other work: one torch thread is much faster than two (methods.md §5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Where the solves run (`QuAILoRAConfig.solve_device`): the same factors on the CPU, overlapped with calibration, and
a float32 solve near the float64 optimum."""

import logging

import pytest
import torch

from hf_quailora import QuAILoRAConfig
from hf_quailora.quailora.placement import choose_placement, solve_groups
from hf_quailora.quailora.solvers import calibrated_error, solve_closed_form
from tests.quailora.test_streaming import assert_same_factors, init_factors

from testing_utils import require_bitsandbytes


def test_solve_device_is_checked():
    with pytest.raises(ValueError, match="solve_device"):
        QuAILoRAConfig(solve_device="gpu")


def test_auto_keeps_a_cpu_model_where_it_is():
    model = torch.nn.Linear(4, 4)
    placement = choose_placement(QuAILoRAConfig(), model, [(4, 4, 2)])
    assert placement.solve_device is None and not placement.gram_on_cpu  # as before the "auto" policy
    assert choose_placement(QuAILoRAConfig(solve_device="cpu"), model, [(4, 4, 2)]).solve_device == torch.device("cpu")
    assert choose_placement(QuAILoRAConfig(gram_device="cpu"), model, [(4, 4, 2)]).gram_on_cpu


def test_overlapped_groups_come_back_in_order_and_overlap(caplog):
    import time

    def groups():
        for index in range(3):
            time.sleep(0.05)  # "calibration"
            yield index, [index]

    def solve(stats, group):
        time.sleep(0.05)
        return stats

    with caplog.at_level(logging.INFO, logger="hf_quailora.quailora.placement"):
        started = time.perf_counter()
        results = [result for _, result, _ in solve_groups(groups(), solve, overlap=True)]
        seconds = time.perf_counter() - started
    assert results == [0, 1, 2]
    assert seconds < 0.28  # 0.30 one after the other; overlapped about 0.20
    assert len([record for record in caplog.records if "solved" in record.getMessage()]) == 3


@require_bitsandbytes
def test_cpu_solves_give_the_same_factors(tiny_model_path, tiny_texts, caplog):
    reference, _ = init_factors(tiny_model_path, tiny_texts, streaming="replay")
    with caplog.at_level(logging.INFO, logger="hf_quailora.quailora.placement"):
        factors, report = init_factors(tiny_model_path, tiny_texts, streaming="replay", solve_device="cpu")
    assert_same_factors(factors, reference)
    spans = [record.getMessage() for record in caplog.records if "calibrated" in record.getMessage()]
    assert len(spans) == 2  # one line per block: its calibration and solve spans


def test_float32_solve_is_near_the_float64_optimum():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, dtype=torch.float64, generator=generator) @ torch.randn(256, 256, dtype=torch.float64,
                                                                                         generator=generator)
    H = (X.T @ X).float()  # float32, as the init accumulates it
    E = torch.randn(384, 256, dtype=torch.float64, generator=generator) * 1e-2
    objective = {}
    for dtype in (torch.float64, torch.float32):
        B, A, _ = solve_closed_form(E.to(dtype), H, 16)
        objective[dtype] = float(calibrated_error(E, H.double(), B.double(), A.double()))
    assert objective[torch.float32] <= objective[torch.float64] * 1.001


def test_gram_by_column_blocks_equals_the_whole_product():
    from hf_quailora.quailora.placement import add_gram, add_gram_by_blocks

    rows = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    whole, blocks = torch.zeros(70, 70, dtype=torch.float64), torch.zeros(70, 70, dtype=torch.float64)
    add_gram(whole, rows)
    add_gram_by_blocks(blocks, rows, columns=16)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-5)

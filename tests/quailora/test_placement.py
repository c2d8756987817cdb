"""Where the solves run (`QuAILoRAConfig.solve_device`): the same factors on the CPU, overlapped with calibration, and
a float32 solve near the float64 optimum; the `"auto"` placement's decisions (pure, no GPU needed)."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from hf_quailora import QuAILoRAConfig
from hf_quailora.quailora.finetune_memory import estimate_finetune_memory
from hf_quailora.quailora.memory import estimate_init_memory
from hf_quailora.quailora.placement import (
    PLACEMENTS,
    aim_at_training,
    choose_placement,
    decide_placement,
    solve_groups,
)
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


def test_rows_are_masked_and_upcast_by_chunks_to_the_same_values():
    from hf_quailora.quailora.placement import float_rows

    rows = torch.randn(11, 6, generator=torch.Generator().manual_seed(2)).bfloat16()
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert torch.equal(float_rows(rows, mask, chunk=3), rows[mask].float())
    assert torch.equal(float_rows(rows), rows.float())
    assert torch.equal(float_rows(rows.float(), mask), rows.float()[mask])


@require_bitsandbytes
def test_factors_are_those_of_the_former_out_of_place_cholesky(tiny_model_path, tiny_texts, monkeypatch):
    from hf_quailora.quailora import solvers

    factors, report = init_factors(tiny_model_path, tiny_texts, streaming="replay")

    def former_damp(H, damping, dtype=None):  # a row-major copy, factorised out of place below
        damped = H.to(dtype or H.dtype, copy=True)
        damped.diagonal().add_(max(damping, torch.finfo(damped.dtype).eps) * torch.diagonal(damped).mean())
        return damped

    monkeypatch.setattr(solvers, "damp", former_damp)
    monkeypatch.setattr(solvers, "_cholesky", lambda H: torch.linalg.cholesky_ex(H)[0])
    former, former_report = init_factors(tiny_model_path, tiny_texts, streaming="replay")
    assert former.keys() == factors.keys()
    for name, value in former.items():
        assert torch.equal(factors[name], value), name
    for layer, reference in zip(report.layers, former_report.layers):  # the chunked E·H: the same sums, reordered
        assert math.isclose(layer.calibrated_error_result, reference.calibrated_error_result, rel_tol=1e-9)


def _llama(**sizes):
    return SimpleNamespace(**{"num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                              "tie_word_embeddings": True, **sizes})


LLAMA_1B = _llama(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32)


def test_auto_takes_the_cheapest_placement_under_free_memory_and_the_finetuning_step():
    init, target = estimate_init_memory(LLAMA_1B), estimate_finetune_memory(LLAMA_1B).training_extra
    big, peaks = 80 * 2**30, {option: init.placed_peak(*option) for option in PLACEMENTS}

    def decided(*args, **kwargs):
        choice = decide_placement(init, *args, **kwargs)
        return choice.solve_on_cpu, choice.gram_on_cpu, choice.fits

    assert decided(big, None) == (False, False, True)  # room, and no fine-tuning step to stay under
    assert decided(big, peaks[False, False]) == (False, False, True)
    assert decided(peaks[True, False], None) == (True, False, True)  # the solve no longer fits: it moves first
    assert decided(big, target) == (True, True, True)  # batch 1 × 2048 QLoRA: both leave the GPU
    assert decide_placement(init, big, target).peak <= target
    assert decided(big, target, solve_device="model") == (False, True, False)  # explicit settings win...
    assert decided(big, target, "model", "model") == (False, False, False)  # ...even when nothing fits
    assert decided(2**20, target) == (True, True, False)  # nothing fits: the smallest


def test_auto_meets_the_finetuning_peak_at_every_row_of_the_contract():
    import os
    import sys

    from testing_utils import REPO_ROOT

    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))  # `bench` itself is tests/bench here (tests/conftest.py)
    try:
        from bench_init_scaling import REAL_MODELS
    finally:
        sys.path.pop(0)
    for name, config in REAL_MODELS.items():
        config = SimpleNamespace(**config)
        target = estimate_finetune_memory(config).training_extra
        choice = decide_placement(estimate_init_memory(config), 2**50, target)
        assert choice.fits and choice.peak <= target, name


def test_auto_on_an_accelerator_logs_its_choice_once(tiny_model_path, caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # not the CPU, so "auto" decides (the meta device's "free memory" is the host's)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_path))
    layers = [(module.out_features, module.in_features, 4) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and "layers" in name]
    with caplog.at_level(logging.INFO, logger="hf_quailora.quailora.placement"):
        choice = choose_placement(QuAILoRAConfig(), model, layers)
        fixed = choose_placement(QuAILoRAConfig(solve_device="model", gram_device="cpu"), model, layers)
    lines = [record.getMessage() for record in caplog.records if "QuAILoRA solves on" in record.getMessage()]
    assert len(lines) == 1 and ("under" if choice.fits else "over") in lines[0], lines
    assert choice.fits == (choice.peak <= choice.limit)  # a 64-wide model: 8 × 512 calibration tokens exceed 1 × 2048
    assert (fixed.solve_on_cpu, fixed.gram_on_cpu) == (False, True)
    # the callback aims at its run's own step (here 8 × 1024 with AdamW: room for everything on the device)
    with caplog.at_level(logging.INFO, logger="hf_quailora.quailora.placement"):
        with aim_at_training(SimpleNamespace(per_device_train_batch_size=8, max_length=1024, optim="adamw_torch")):
            larger = choose_placement(QuAILoRAConfig(), model, layers)
    assert "batch 8 × 1024" in caplog.records[-1].getMessage() and larger.limit > choice.limit
    assert (larger.solve_on_cpu, larger.gram_on_cpu, larger.fits) == (False, False, True)

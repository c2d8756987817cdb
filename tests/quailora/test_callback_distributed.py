"""QuAILoRAInitCallback in a real two-process run (torchrun, gloo, CPU): identical weights on every process."""

import os
import subprocess
import sys

import pytest
import torch

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


SCRIPT = os.path.join(SCRIPTS_DIR, "quailora_ddp.py")


# 8 texts in one batch; 7 texts at batch size 1 (4 and 3 batches on two processes); 8 texts trained at lr 1e-2, where
# lr_scale="auto" measures the first step on both processes
CASES = ("8:8", "7:1", "8:8:1e-2")


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """Both cases in one two-process launch and one one-process launch (each case a fresh model and trainer)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    root = tmp_path_factory.mktemp("quailora_ddp")
    for nproc in (2, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + nproc + os.getpid() % 1000), SCRIPT, tiny_model_path,
                   str(root / str(nproc)), *CASES]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]

    def load(case):
        folder = case.replace(":", "-")
        return (torch.load(root / "2" / folder / "rank0.pt"), torch.load(root / "2" / folder / "rank1.pt"),
                torch.load(root / "1" / folder / "rank0.pt"))
    return {case: load(case) for case in CASES}


@require_bitsandbytes
def test_two_processes_end_with_identical_weights_equal_to_one_process(runs):
    rank0, rank1, single = runs["8:8"]
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-2, atol=2e-3, msg=name)


@require_bitsandbytes
def test_uneven_calibration_shares_are_evened_out(runs):
    rank0, rank1, single = runs["7:1"]
    assert rank0["forwards"] == rank1["forwards"], (rank0["forwards"], rank1["forwards"])
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-2, atol=2e-3, msg=name)


@require_bitsandbytes
def test_both_processes_measure_the_same_first_step_and_scale_the_same_rate(runs):
    rank0, rank1, single = runs["8:8:1e-2"]
    assert rank0["first_step"] is not None and rank0["first_step"] == rank1["first_step"]  # all-reduced sums
    correction, step_kl, tokens = rank0["first_step"]
    assert tokens > 0 and single["first_step"] is not None
    assert rank0["lr_scale"] == rank1["lr_scale"] < 1  # at 1e-2 the tiny start's first step is beyond its budget
    from hf_quailora.quailora.first_step import DEFAULT_BUDGET

    assert step_kl[rank0["lr_scale"]] <= DEFAULT_BUDGET * correction < step_kl[2 * rank0["lr_scale"]]
    assert rank0["lr"] == rank1["lr"] == pytest.approx(1e-2 * rank0["lr_scale"])
    for name, value in rank0["weights"].items():  # one DDP step from the same start: still identical
        assert torch.equal(value, rank1["weights"][name]), name

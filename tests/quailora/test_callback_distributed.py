"""QuAILoRAInitCallback in a real two-process run (torchrun, gloo, CPU): identical weights on every process."""

import os
import subprocess
import sys

import torch

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


SCRIPT = os.path.join(SCRIPTS_DIR, "quailora_ddp.py")


def _run_one_and_two_processes(tiny_model_path, tmp_path, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    for out, nproc in ((two, 2), (one, 1)):
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + nproc + os.getpid() % 1000), SCRIPT, tiny_model_path, str(out),
                   *extra]
        # a process left waiting in a collective would hang the test: the timeout ends it as a failure
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt"), torch.load(one / "rank0.pt")


@require_bitsandbytes
def test_two_processes_end_with_identical_weights_equal_to_one_process(tiny_model_path, tmp_path):
    rank0, rank1, single = _run_one_and_two_processes(tiny_model_path, tmp_path)
    assert rank0["world"] == rank1["world"] == 2
    # each process calibrated on half of the 8 samples; the all-reduced count covers them all
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        # the same Gram matrix (summed over shards), so the same solution up to bf16 storage rounding
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-2, atol=2e-3, msg=name)


@require_bitsandbytes
def test_uneven_calibration_shares_are_evened_out(tiny_model_path, tmp_path):
    # 7 texts at batch size 1: 4 batches on process 0, 3 on process 1 until process 1 adds a zero-weight batch
    rank0, rank1, single = _run_one_and_two_processes(tiny_model_path, tmp_path, "7", "1")
    assert rank0["forwards"] == rank1["forwards"], (rank0["forwards"], rank1["forwards"])
    # the padding batch adds no token: the summed statistics are those of the 7 texts, as on one process
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-2, atol=2e-3, msg=name)

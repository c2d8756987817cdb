"""QuAILoRAInitCallback in a real two-process run (torchrun, gloo, CPU): identical weights on every process."""

import os
import subprocess
import sys

import torch

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


SCRIPT = os.path.join(SCRIPTS_DIR, "quailora_ddp.py")


@require_bitsandbytes
def test_two_processes_end_with_identical_weights_equal_to_one_process(tiny_model_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    for out, nproc in ((two, 2), (one, 1)):
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + nproc + os.getpid() % 1000), SCRIPT, tiny_model_path, str(out)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    single = torch.load(one / "rank0.pt")
    assert rank0["world"] == rank1["world"] == 2
    # each process calibrated on half of the 8 samples; the all-reduced count covers them all
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        # the same Gram matrix (summed over shards), so the same solution up to bf16 storage rounding
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-2, atol=2e-3, msg=name)

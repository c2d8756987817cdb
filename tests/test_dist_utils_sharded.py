"""A failure on one process raises on every process, in two CPU processes (torchrun, gloo): the write of process 0
(`run_on_main_process`, used by `export_rank` and `save_model` on sharded models) and the calibration batches of any
process (`equalize_batch_counts`)."""

import os
import subprocess
import sys

from testing_utils import SCRIPTS_DIR


def test_a_failure_on_one_process_raises_on_both(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29900 + os.getpid() % 90), os.path.join(SCRIPTS_DIR, "failures_sharded.py"), str(tmp_path)]
    # a process left waiting would hang: the timeout ends the test as a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    process0 = (tmp_path / "process-0.txt").read_text().split("\n")
    process1 = (tmp_path / "process-1.txt").read_text().split("\n")
    assert process0 == ["ZeroDivisionError", "RuntimeError"]
    assert process1 == ["RuntimeError", "ZeroDivisionError"]

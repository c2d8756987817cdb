"""The exit guard (hf_quailora/_exit_guard.py): processes whose last statement is a gloo collective exit cleanly.

Without the guard, most 8-process launches of tests/scripts/gather_then_exit.py have at least one process abort
at exit ("terminate called without an active exception"; 6 of 6 launches measured, 5 of 8 with 4 processes), so
two clean launches are evidence the guard works, not luck.
"""

import os
import subprocess
import sys

import hf_quailora._exit_guard as exit_guard


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "gather_then_exit.py")


def test_importing_hf_quailora_registers_the_guard():
    import hf_quailora  # noqa: F401

    assert exit_guard._registered


def test_processes_ending_on_a_collective_exit_cleanly():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launch in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8", "--master_port",
                   str(29400 + launch + os.getpid() % 1000), SCRIPT, "--guard"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "terminate called" not in result.stderr

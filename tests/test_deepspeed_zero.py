"""DeepSpeed ZeRO in two CPU processes (torchrun; DeepSpeed's CPU accelerator, which falls back to gloo without
oneCCL) against one process.

- ZeRO-2: `QuAILoRAInitCallback` initialises an NF4 model at `on_init_end`, before DeepSpeed wraps it, and
  `DynamicRankTrainer` trains, saves and exports it. trl stores a quantized model's factors in bf16, and DeepSpeed
  steps an fp32 master copy of them, which a run without DeepSpeed does not: the reference is one process under the
  same ZeRO-2 configuration. (ZeRO-1 takes the same path: see docs/launchers.md.)

ZeRO-3 (the init refused, partitioned factors trained, saved and exported) is checked beside FSDP2 in
tests/dynamic_rank/test_trainer_sharded.py, against the same one-process run.
"""

import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from testing_utils import SCRIPTS_DIR, require_bitsandbytes, require_deepspeed


def _run(script: str, model_path: str, out, nproc: int, *extra: str) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    port = 29700 + 10 * nproc + os.getpid() % 1000
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), os.path.join(SCRIPTS_DIR, script), model_path, str(out), *extra]
    # a process left waiting in a collective would hang: the timeout ends the test as a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"process-{rank}.pt") for rank in range(nproc)]


def _assert_close(got: dict, want: dict, what: str, tolerance: float = 1e-5) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        error = (got[key].float() - value.float()).norm() / value.float().norm().clamp_min(1e-12)
        assert error < tolerance, f"{what} {key}: relative error {error:.2e}"


def _assert_same_files(two, one, names) -> None:
    for name in names:  # written by process 0 only
        _assert_close(load_file(two / name), load_file(one / name), name)
        assert (two / name).with_name("dynamic_rank.json").is_file(), name


@require_deepspeed
@require_bitsandbytes
def test_zero2_init_before_wrapping_and_training_equal_one_process(tiny_model_path, tmp_path):
    process0, process1 = _run("quailora_zero.py", tiny_model_path, tmp_path / "two", 2, "2")
    (single,) = _run("quailora_zero.py", tiny_model_path, tmp_path / "one", 1, "2")
    assert process0["engine"] == single["engine"] == "DeepSpeedEngine"
    # the init: identical on both processes; against one process, the same solution up to the bf16 storage of the
    # factors (the Gram matrices are summed over the processes' shares in another order)
    for name, value in process0["initialised"].items():
        assert torch.equal(value, process1["initialised"][name]), name
    _assert_close(process0["initialised"], single["initialised"], "init", tolerance=1e-3)
    assert process0["rank_history"] == process1["rank_history"] == single["rank_history"]
    _assert_close(process0["trained"], single["trained"], "trained")
    _assert_close(process1["trained"], single["trained"], "trained on process 1")
    _assert_same_files(tmp_path / "two", tmp_path / "one",
                       ("saved/adapter_model.safetensors", "rank-2/adapter_model.safetensors"))
    for process in (process0, process1):  # evaluate() under ZeRO-2: each rank's loss, as the saved adapter's
        assert set(process["metrics"]) == {"eval_loss@r2", "eval_loss@r4"}, process["metrics"]
        for key, value in process["metrics"].items():
            assert math.isclose(value, process["reference"][key], rel_tol=1e-5), (key, value, process["reference"])


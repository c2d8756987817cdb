"""DynamicRankTrainer on FSDP2 in two CPU processes (torchrun, gloo) against one process: steps, `save_model` and
`export_rank` agree to 1e-5 relative, with the LoRA factors replicated (sharded at load time by transformers'
`DistributedConfig(fsdp_size=2)`) or sharded themselves (`fully_shard` after peft: `DTensor` factors), on an fp32
base and on an NF4 base (whose factors trl casts to bf16: the one-process run accumulates the same micro-batches)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


SCRIPT = os.path.join(SCRIPTS_DIR, "dynamic_rank_fsdp2.py")
FILES = ("saved/adapter_model.safetensors", "rank-4/adapter_model.safetensors")


def _run(model_path, out, nproc: int, route: str, base: str, truncation: str = "slice") -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = 29600 + 10 * nproc + os.getpid() % 1000 + (route == "fully_shard") + 2 * (base == "nf4") + 4 * (
        truncation == "static")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), SCRIPT, model_path, str(out), route, base, truncation]
    # a process left waiting in a collective would hang: the timeout ends the test as a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        error = (got[key].to(value.dtype).float() - value.float()).norm() / value.float().norm().clamp_min(1e-12)
        assert error < 1e-5, f"{what} {key}: relative error {error:.2e}"


@pytest.mark.parametrize("route, base", [
    ("load", "fp32"),
    ("fully_shard", "fp32"),
    pytest.param("fully_shard", "nf4", marks=require_bitsandbytes),
])
def test_fsdp2_equals_one_process(tiny_model_path, tmp_path, route, base):
    two, one = tmp_path / "two", tmp_path / "one"
    _run(tiny_model_path, two, 2, route, base)
    _run(tiny_model_path, one, 1, route, base)
    process0, process1 = torch.load(two / "process-0.pt"), torch.load(two / "process-1.pt")
    single = torch.load(one / "process-0.pt")
    if route == "fully_shard":
        assert process0["lora_types"] == ["DTensor"]  # the factors themselves were sharded
    if base == "nf4":  # trl's bf16 cast reached the local shards too (else the first fused AdamW step fails)
        assert {value.dtype for value in process0["weights"].values()} == {torch.bfloat16}
    assert process0["rank_history"] == process1["rank_history"] == single["rank_history"]
    _assert_close(process0["weights"], single["weights"], "weights")
    _assert_close(process1["weights"], single["weights"], "weights of process 1")
    for name in FILES:  # written by process 0 only, from factors gathered whole
        _assert_close(load_file(two / name), load_file(one / name), name)
    assert (two / "saved" / "dynamic_rank.json").is_file() and (two / "rank-4" / "dynamic_rank.json").is_file()


def test_fsdp2_static_rank_path_equals_one_process_slicing(tiny_model_path, tmp_path):
    """The static-shape truncation of `torch_compile=True` (a mask inside the factors' forward) on sharded `DTensor`
    factors gives the one-process slicing run's weights and exports (issue "One compiled graph for every rank")."""
    two, one = tmp_path / "two", tmp_path / "one"
    _run(tiny_model_path, two, 2, "fully_shard", "fp32", "static")
    _run(tiny_model_path, one, 1, "fully_shard", "fp32")
    process0, single = torch.load(two / "process-0.pt"), torch.load(one / "process-0.pt")
    assert process0["lora_types"] == ["DTensor"]
    assert process0["factor_classes"] == ["_MaskedLoraLinear"] and single["factor_classes"] == ["Linear"]
    assert process0["rank_history"] == single["rank_history"]
    _assert_close(process0["weights"], single["weights"], "weights")
    for name in FILES:
        _assert_close(load_file(two / name), load_file(one / name), name)

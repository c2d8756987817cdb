"""QuAILoRA's init on FSDP2 models in two CPU processes (torchrun, gloo) against one process on the whole model.

One run of `tests/scripts/quailora_fsdp2.py` covers: `quailora_init` on an fp32 base sharded at load
(`DistributedConfig(fsdp_size=2)`, whole LoRA factors), on the same base `fully_shard`ed after peft (`DTensor`
factors), and on an NF4 base `fully_shard`ed after peft; `QuAILoRAInitCallback` in a `Trainer` on the model sharded
at load; and two failures planned on process 1 only, each raised on both processes. The fp32 base is the tiny Llama
rounded to a grid, reported as quantized by a test backend whose `Q` is the layer's own weight (gathered whole): the
rounding is its quantization error. The one-process reference runs here, in this process, on the whole models.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


SCRIPT = os.path.join(SCRIPTS_DIR, "quailora_fsdp2.py")
pytestmark = require_bitsandbytes  # the run includes an NF4 base


def _script_module():
    spec = importlib.util.spec_from_file_location("quailora_fsdp2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k].float() - v.float()).norm() / v.float().norm().clamp_min(1e-12)) for k, v in want.items())


@pytest.fixture(scope="module")
def two_processes(tiny_model_path, tmp_path_factory):
    script = _script_module()
    rounded, out = tmp_path_factory.mktemp("rounded"), tmp_path_factory.mktemp("fsdp2-init")
    script.make_rounded_checkpoint(tiny_model_path, str(rounded))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29700 + os.getpid() % 1000), SCRIPT, tiny_model_path, str(rounded), str(out)]
    # a process left waiting in a collective would hang the test: the timeout ends it as a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return script, str(rounded), [torch.load(out / f"process-{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tiny_model_path, two_processes):
    script, rounded, _ = two_processes
    return {case: _one_process(script, tiny_model_path, rounded, case) for case in script.CASES}


def _one_process(script, tiny_model_path, rounded, case):
    """`quailora_init` in this process on the whole model, on all the texts the two processes shared."""
    from transformers import AutoTokenizer

    from hf_quailora import QuAILoRAConfig, quailora_init
    from hf_quailora.quantization import register_backend, unregister_backend

    register_backend(script.ROUNDED_BACKEND)
    try:
        model = script.load_lora_model(tiny_model_path, rounded, case)
        report = quailora_init(model, script.TEXTS, QuAILoRAConfig(**script.SETTINGS),
                               tokenizer=AutoTokenizer.from_pretrained(tiny_model_path),
                               **script.init_kwargs(tiny_model_path, case))
        with torch.no_grad():
            logits = model(input_ids=script.PROBE).logits
    finally:
        unregister_backend(script.ROUNDED_BACKEND.name)
    return script.lora_weights(model), logits, report.num_tokens


def test_fsdp2_init_equals_one_process(tiny_model_path, two_processes, one_process):
    _, _, processes = two_processes
    assert processes[0]["lora_types"] == {"load": ["Parameter"], "fully_shard": ["DTensor"], "nf4": ["DTensor"],
                                          "nf4-bf16": ["DTensor"]}
    for case, (weights, logits, tokens) in one_process.items():
        # fp32 factors (the NF4 base's Q is exact on both sides): 1e-5 relative; bf16 factors: the same solution
        # rounded to bf16 on both sides, so within one bf16 rounding (2^-8 relative) where the two straddle a boundary
        bf16 = case == "nf4-bf16"
        bound, close = (2.0 ** -8, {"rtol": 2.0 ** -8, "atol": 1e-4}) if bf16 else (1e-5, {"rtol": 1e-5, "atol": 1e-5})
        for index, process in enumerate(processes):
            assert process[f"tokens_{case}"] == tokens, (case, index)  # each calibrated half; the sum is all
            error = _relative_error(process["weights"][case], weights)
            assert error < bound, f"{case}, process {index}: factors off by {error:.2e}"
            # the forward after the init all-gathers the written shards, not a stale copy
            torch.testing.assert_close(process[f"logits_{case}"], logits, **close)
        for name, value in processes[0]["weights"][case].items():  # process 0's factors on every process
            assert torch.equal(value, processes[1]["weights"][case][name]), (case, name)


@pytest.mark.parametrize("case", ["load", "fully_shard"])
def test_the_callback_initialises_an_fsdp2_model_in_a_trainer(two_processes, one_process, case):
    _, _, processes = two_processes
    weights, _, tokens = one_process[case]
    for index, process in enumerate(processes):
        run = process[f"callback_{case}"]
        # the Trainer does not wrap a model sharded before it (marked as sharded at load): the callback initialises
        # at on_train_begin, writing whole factors (load) or DTensor shards (fully_shard) that the optimizer holds
        assert run["at_init_end"] is False and run["tokens"] == tokens
        # lr_scale="auto" is not measured on sharded weights: the rate is kept, the run goes on
        assert run["lr_scale"] == 1.0 and run["measured"] is False
        error = _relative_error(run["weights"], weights)  # learning rate 1e-30: the init itself
        assert error < 1e-5, f"{case}, process {index}: factors off by {error:.2e}"


def test_a_failure_on_one_process_raises_on_both(two_processes):
    _, _, (process0, process1) = two_processes
    # process 1's full-precision weights lack a layer: refused while planning, before any collective
    assert process1["failures"][0].startswith("ValueError: base_model.model.model.layers.1.mlp.up_proj: no full")
    assert process0["failures"][0] == (
        "RuntimeError: Process 0: planning the QuAILoRA init failed on another process; see its error.")
    # process 1's W of one layer is not finite: found in its solve, after calibration; process 0 stops there too
    assert process1["failures"][1] == "ValueError: base_model.model.model.layers.1.mlp.up_proj: the full-precision " \
                                      "weight W is not finite."
    assert process0["failures"][1].startswith(
        "RuntimeError: Process 0: the QuAILoRA solve of base_model.model.model.layers.1.mlp.up_proj failed on another")

"""DynamicRankTrainer on FSDP2 in two CPU processes (torchrun, gloo) against one process: steps, `save_model` and
`export_rank` agree to 1e-5 relative, with the LoRA factors replicated (sharded at load time by transformers'
`DistributedConfig(fsdp_size=2)`) or sharded themselves (`fully_shard` after peft: `DTensor` factors), on an fp32
base and on an NF4 base (whose factors trl casts to bf16: the one-process run accumulates the same micro-batches).
The same run under DeepSpeed ZeRO-3 (factors partitioned) agrees with the one-process fp32 run too, and so does FSDP1
(`FullyShardedDataParallel`, `use_orig_params=True`, wrapped by the script) with peft's wrap policy (each LoRA factor
wrapped) and with one unit per decoder block. In each set-up `evaluate()`'s `eval_loss@r{b}` equals the saved
adapter's loss at rank b in one unwrapped process.

A QuAILoRA start written once by `hf-quailora init` (NF4, r = 8) is then trained in the same launches (`--from_adapter`):
loaded with plain `PeftModel.from_pretrained(..., is_trainable=True)` on an NF4 base under FSDP2 (`fully_shard`), on an
fp32 base under FSDP1 and ZeRO-3 (neither script takes a quantized base), it resolves `rank_scaling="constant"` on
every process, gives the in-memory start's logits before training, and trains, saves and exports as one process
trained from the same folder."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from testing_utils import SCRIPTS_DIR, require_bitsandbytes, require_deepspeed


SCRIPT = os.path.join(SCRIPTS_DIR, "dynamic_rank_fsdp2.py")
ZERO3_SCRIPT = os.path.join(SCRIPTS_DIR, "dynamic_rank_zero3.py")
FSDP1_SCRIPT = os.path.join(SCRIPTS_DIR, "dynamic_rank_fsdp1.py")
FILES = ("saved/adapter_model.safetensors", "rank-4/adapter_model.safetensors")


class _Start:
    """A QuAILoRA start written by `hf-quailora init` (`folder`) and the in-memory model it came from."""

    def __init__(self, folder, model, model_path):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from hf_quailora.quantization import prepare_for_exact_weights

        self.folder, self.models = folder, {"nf4": model}
        prepare_for_exact_weights(model)  # methods.md §5: the logits' no-grad pass must not repack the 4-bit weights
        # the same factors, copied in memory (not through the folder), onto the fp32 base of FSDP1 and ZeRO-3
        twin = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                              copy.deepcopy(model.peft_config["default"]))
        factors = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in twin.named_parameters():
                if "lora_" in name:
                    param.copy_(factors[name])
        self.models["fp32"] = twin

    @torch.no_grad()
    def logits(self, ids: list, base: str) -> torch.Tensor:
        model = self.models[base].eval()
        return model(input_ids=torch.tensor(ids)).logits.float()

    def option(self) -> list[str]:
        return ["--from_adapter", str(self.folder)]


@pytest.fixture(scope="module")
def quailora_start(tiny_model_path, tmp_path_factory):
    """`hf-quailora init` once, in this process (NF4, LoRA r = 8 on every linear layer); None without bitsandbytes."""
    from hf_quailora.scripts.init_adapter import init_adapter, make_parser

    from conftest import TINY_TEXTS

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    root = tmp_path_factory.mktemp("quailora-start")
    (root / "calibration.txt").write_text("\n".join(TINY_TEXTS))
    model, _ = init_adapter(*make_parser().parse_args_and_config([
        "--model_name_or_path", tiny_model_path, "--lora_r", "8", "--calibration_dataset", str(root / "calibration.txt"),
        "--calibration_samples", "4", "--calibration_length", "32", "--show_progress", "false",
        "--output_dir", str(root / "start")]))
    return _Start(root / "start", model, tiny_model_path)


@pytest.fixture(scope="module")
def one_process_fp32(tiny_model_path, tmp_path_factory, quailora_start):
    """The one-process fp32 run that every fp32 set-up is compared with (the same for each route), then the same
    from the QuAILoRA start (in `adapter/`): run once."""
    one = tmp_path_factory.mktemp("fsdp2") / "one"
    _run(tiny_model_path, one, 1, "load", "fp32", options=quailora_start.option() if quailora_start else [])
    return one


def _run(model_path, out, nproc: int, route: str, base: str, truncation: str = "slice", options=()) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    port = 29600 + 10 * nproc + os.getpid() % 1000 + (route == "fully_shard") + 2 * (base == "nf4") + 4 * (
        truncation == "static") + 8 * (route == "zero3") + 9 * (route == "fsdp1")
    script, extra = (ZERO3_SCRIPT, ["zero3"]) if route == "zero3" else (SCRIPT, [route, base, truncation])
    if route == "fsdp1":
        script, extra = FSDP1_SCRIPT, ["peft,layer"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), script, model_path, str(out), *extra, *options]
    # a process left waiting in a collective would hang: the timeout ends the test as a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        error = (got[key].to(value.dtype).float() - value.float()).norm() / value.float().norm().clamp_min(1e-12)
        assert error < 1e-5, f"{what} {key}: relative error {error:.2e}"


def _assert_equal_to_one_process(processes: list[dict], single: dict, two, one) -> None:
    """Every process's rank sequence and weights, and the files process 0 wrote, equal the one-process run's."""
    for index, process in enumerate(processes):
        assert process["rank_history"] == single["rank_history"], f"process {index}"
        _assert_close(process["weights"], single["weights"], f"weights of process {index}")
    for name in FILES:  # written by process 0 only, from factors gathered whole
        _assert_close(load_file(two / name), load_file(one / name), name)


def _assert_per_rank_eval(processes: list[dict], what: str) -> None:
    """`evaluate()`'s `eval_loss@r{b}` on every process equals the saved adapter's loss at rank b, unwrapped, in one
    process."""
    for index, process in enumerate(processes):
        assert process["metrics"].keys() == process["reference"].keys() == {"eval_loss@r2", "eval_loss@r8"}
        for key, value in process["reference"].items():
            assert abs(process["metrics"][key] - value) <= 1e-5 * abs(value), (what, index, key)


def _assert_trained_from_start(start: _Start, base: str, two, one) -> None:
    """The runs from the QuAILoRA start (`adapter/` of each launch): `constant` on every process, the in-memory
    start's logits before training, then steps, files and per-rank losses as one process from the same folder."""
    two, one = two / "adapter", one / "adapter"
    processes = [torch.load(two / f"process-{rank}.pt") for rank in range(2)]
    single = torch.load(one / "process-0.pt")
    for process in processes:
        assert process["rank_scaling"] == "constant"
        torch.testing.assert_close(process["start_logits"], start.logits(process["start_ids"], base),
                                   rtol=1e-5, atol=1e-5)
    _assert_equal_to_one_process(processes, single, two, one)
    _assert_per_rank_eval(processes, "from the start")


@pytest.mark.parametrize("route, base", [
    ("load", "fp32"),
    ("fully_shard", "fp32"),
    pytest.param("fully_shard", "nf4", marks=require_bitsandbytes),
])
def test_fsdp2_equals_one_process(tiny_model_path, tmp_path, request, route, base):
    """... and, with an NF4 base, the QuAILoRA start of `hf-quailora init` trained sharded in the same launch."""
    two, one = tmp_path / "two", tmp_path / "one"
    start = request.getfixturevalue("quailora_start") if base == "nf4" else None
    _run(tiny_model_path, two, 2, route, base, options=start.option() if start else [])
    if base == "fp32":
        one = request.getfixturevalue("one_process_fp32")
    else:
        _run(tiny_model_path, one, 1, route, base, options=start.option())
    process0, process1 = torch.load(two / "process-0.pt"), torch.load(two / "process-1.pt")
    single = torch.load(one / "process-0.pt")
    if route == "fully_shard":
        assert process0["lora_types"] == ["DTensor"]  # the factors themselves were sharded
    if base == "nf4":  # trl's bf16 cast reached the local shards too (else the first fused AdamW step fails)
        assert {value.dtype for value in process0["weights"].values()} == {torch.bfloat16}
    _assert_equal_to_one_process([process0, process1], single, two, one)
    assert (two / "saved" / "dynamic_rank.json").is_file() and (two / "rank-4" / "dynamic_rank.json").is_file()
    _assert_per_rank_eval([process0, process1], f"{route} {base}")
    if start is not None:
        _assert_trained_from_start(start, base, two, one)


def test_fsdp2_static_rank_path_equals_one_process_slicing(tiny_model_path, tmp_path, one_process_fp32):
    """The static-shape truncation of `torch_compile=True` (a mask inside the factors' forward) on sharded `DTensor`
    factors gives the one-process slicing run's weights and exports (issue "One compiled graph for every rank"), and
    `evaluate()` per rank through it."""
    two, one = tmp_path / "two", one_process_fp32
    _run(tiny_model_path, two, 2, "fully_shard", "fp32", "static")
    process0, single = torch.load(two / "process-0.pt"), torch.load(one / "process-0.pt")
    assert process0["lora_types"] == ["DTensor"]
    assert process0["factor_classes"] == ["_MaskedLoraLinear"] and single["factor_classes"] == ["Linear"]
    _assert_equal_to_one_process([process0], single, two, one)
    _assert_per_rank_eval([process0], "static")


@require_deepspeed
def test_zero3_refuses_the_init_and_gathers_partitioned_factors(tiny_model_path, tmp_path, one_process_fp32,
                                                                quailora_start):
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo): the base partitioned at load, so `QuAILoRAInitCallback` refuses it
    naming `hf-quailora init`; the partitioned factors train as on one process; `save_model` (transformers'
    consolidated state dict) and `export_rank` (`GatheredParameters`, process 0 writes) equal one process;
    `evaluate()` per rank. Then the same from the QuAILoRA start of `hf-quailora init` (fp32 base)."""
    two = tmp_path / "two"
    _run(tiny_model_path, two, 2, "zero3", "fp32", options=quailora_start.option() if quailora_start else [])
    process0, process1 = torch.load(two / "process-0.pt"), torch.load(two / "process-1.pt")
    single = torch.load(one_process_fp32 / "process-0.pt")
    assert process0["engine"] == "DeepSpeedEngine"
    assert process0["partitioned"] == ["Parameter(0,)"]  # the factors themselves were partitioned
    for process in (process0, process1):
        assert "DeepSpeed ZeRO-3" in process["refusal"] and "hf-quailora init" in process["refusal"]
    _assert_equal_to_one_process([process0, process1], single, two, one_process_fp32)
    assert (two / "saved" / "dynamic_rank.json").is_file() and (two / "rank-4" / "dynamic_rank.json").is_file()
    _assert_per_rank_eval([process0, process1], "zero3")
    if quailora_start is not None:
        _assert_trained_from_start(quailora_start, "fp32", two, one_process_fp32)


def test_fsdp1_equals_one_process(tiny_model_path, tmp_path, one_process_fp32, quailora_start):
    """FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`, CPU): peft's wrap policy (each LoRA factor its own
    FSDP module: truncation swaps the `nn.Linear` inside) and one unit per decoder block train as one process;
    `save_model` and `export_rank` gather the factors whole, process 0 writes (`dynamic_rank/fsdp1.py`); `evaluate()`'s
    `eval_loss@r{b}` equals the loss of the saved adapter at rank b, unwrapped in one process. Then, with peft's
    policy, the same from the QuAILoRA start of `hf-quailora init` (fp32 base)."""
    from peft import LoraConfig

    _run(tiny_model_path, tmp_path / "two", 2, "fsdp1", "fp32",
         options=quailora_start.option() if quailora_start else [])
    single = torch.load(one_process_fp32 / "process-0.pt")
    for policy, wrapped_factors in (("peft", 28), ("layer", 0)):
        two = tmp_path / "two" / policy
        process0, process1 = torch.load(two / "process-0.pt"), torch.load(two / "process-1.pt")
        assert process0["model_class"] == "FullyShardedDataParallel"
        assert process0["wrapped_factors"] == wrapped_factors  # 2 blocks x 7 targets x (A, B) under peft's policy
        assert process0["rank_history"] == process1["rank_history"] == single["rank_history"]
        _assert_close(process0["weights"], single["weights"], f"{policy}: weights")
        _assert_close(process1["weights"], single["weights"], f"{policy}: weights of process 1")
        for name in FILES:  # written by process 0 only, from factors gathered whole
            _assert_close(load_file(two / name), load_file(one_process_fp32 / name), f"{policy}: {name}")
            got, want = (LoraConfig.from_pretrained(folder / os.path.dirname(name))
                         for folder in (two, one_process_fp32))
            assert (got.r, got.lora_alpha, set(got.target_modules)) == (
                want.r, want.lora_alpha, set(want.target_modules))
        assert (two / "saved" / "dynamic_rank.json").is_file() and (two / "rank-4" / "dynamic_rank.json").is_file()
        _assert_per_rank_eval([process0, process1], policy)
    if quailora_start is not None:
        _assert_trained_from_start(quailora_start, "fp32", tmp_path / "two", one_process_fp32)


def test_fsdp1_refuses_modules_to_save_naming_fsdp2(tiny_model_path, tmp_path):
    """Under FSDP1 only LoRA factors are gathered for saving: `modules_to_save` is refused, naming FSDP2 (a real
    one-process gloo group), before anything is written."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import AutoModelForCausalLM

    from hf_quailora import export_rank

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                               LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"modules_to_save.*FSDP2"):
            export_rank(wrapped, 2, str(tmp_path / "rank-2"))
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "rank-2").exists()

"""hf_quailora inside axolotl (hf_quailora/integrations/axolotl): the plugin and its YAML blocks through axolotl's
own config validation (`load_cfg`), dataset loading (`load_datasets`) and training (`axolotl.train.train`, its trainer
builder), on the tiny Llama, CPU, a few steps; and in two CPU processes (DDP over gloo: axolotl's CLI entry under
torchrun, tests/scripts/axolotl_ddp.py, which says what a CPU needs beyond `axolotl train`).

axolotl needs Python >= 3.12: `make test-axolotl` builds that environment (`.venv-axolotl`) and runs this file there.
In the main environment (Python 3.11, no axolotl) the axolotl tests skip; the block parsing tests (pydantic only)
run everywhere.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_quailora.dynamic_rank.spec import METADATA_FILE, DynamicRankMetadata

from testing_utils import SCRIPTS_DIR, R, one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
require_axolotl = pytest.mark.skipif(
    not HAS_AXOLOTL,
    reason="needs axolotl, which needs Python >= 3.12; the main .venv is Python 3.11 without it. "
    "`make test-axolotl` builds .venv-axolotl (Python 3.12, axolotl 0.21) and runs this file there.",
)
PLUGIN = "hf_quailora.integrations.axolotl.QuAILoRAPlugin"
PROBE = "axolotl_probe.ProbePlugin"  # tests/scripts/axolotl_probe.py: what each process held, for the torchrun tests
STEPS = 3


# ---------------------------------------------------------------------------------------------------------------------
# The blocks, parsed by the library's own classes (pydantic only: runs in every environment)


def test_blocks_are_parsed_by_the_library_classes():
    from hf_quailora.integrations.axolotl.args import (
        QuAILoRAArgs,
        check_blocks_with_config,
        turn_off_lora_kernels,
    )

    # Alone, as here, the model sees only the keys given; merged into axolotl's config it sees the whole YAML.
    args = QuAILoRAArgs(adapter="qlora", quailora={"solver": "als", "calibration_dataset": "c4"}, dynamic_rank=True)
    assert args.quailora == {"solver": "als", "calibration_dataset": "c4"} and args.dynamic_rank == {}
    assert QuAILoRAArgs().quailora is None and QuAILoRAArgs(dynamic_rank=False).dynamic_rank is None
    bad = [
        ({"quailora": {"solver": "exact"}}, "solver"),  # QuAILoRAConfig's own check, naming the field
        ({"dynamic_rank": {"min_rnk": 2}}, r"unknown keys \['min_rnk'\]"),
        ({"dynamic_rank": {"seed": 3}}, "seed"),  # axolotl's own `seed` is the fallback of rank_seed
        ({"dynamic_rank": {"update_rule": "bogus"}}, "update_rule"),  # DynamicRankSettings' own check
        ({"dynamic_rank": {"min_rank": 0}}, "min_rank"),
        ({"quailora": "yes"}, "mapping"),
    ]
    for block, message in bad:
        with pytest.raises(ValueError, match=message):
            QuAILoRAArgs(adapter="lora", **block)

    raw = {"adapter": "qlora", "dynamic_rank": {}, "lora_o_kernel": True}
    assert turn_off_lora_kernels(raw) == ["lora_mlp_kernel", "lora_qkv_kernel", "lora_embedding_kernel"]
    assert raw["lora_o_kernel"] is True and raw["lora_mlp_kernel"] is False
    assert turn_off_lora_kernels({"adapter": "qlora"}) == []  # no block: axolotl's defaults stay
    refusals = [
        ({"adapter": None, "dynamic_rank": {}}, "adapter: lora"),
        ({"adapter": "qlora", "quailora": {}, "lora_model_dir": "start"}, "hf-quailora init"),
        ({"adapter": "lora", "quailora": {}, "peft_init_lora_weights": "pissa"}, "peft_init_lora_weights"),
        ({"adapter": "lora", "dynamic_rank": {}, "rl": "dpo"}, "rl: dpo"),
        ({"adapter": "lora", "dynamic_rank": {}, "lora_o_kernel": True}, "lora_o_kernel: false"),
    ]
    for config, message in refusals:
        with pytest.raises(ValueError, match=message):
            check_blocks_with_config(config)


# ---------------------------------------------------------------------------------------------------------------------
# Through axolotl


def _config(tiny_model_path, run_dir, name, **settings):
    """An axolotl YAML for the tiny Llama (completion data, CPU, fp32, STEPS steps), written to `run_dir/name.yml`."""
    import yaml

    config = {
        "base_model": tiny_model_path,
        "datasets": [{"path": str(run_dir / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(run_dir / "prepared"),
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
        "val_set_size": 0,
        "output_dir": str(run_dir / name),
        "sequence_len": 32,
        "adapter": "lora",
        "lora_r": R,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "num_epochs": 1,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
    }
    config.update(settings)
    path = run_dir / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_texts):
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # axolotl's telemetry: off, and nothing leaves the machine
    path = tmp_path_factory.mktemp("axolotl")
    with open(path / "data.jsonl", "w") as file:
        for text in tiny_texts:
            file.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset_meta(run_dir, tiny_model_path):
    """axolotl's own dataset loading, once (its prepared-dataset save spawns a process: tens of seconds)."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets

    cfg = load_cfg(str(_config(tiny_model_path, run_dir, "data", lora_mlp_kernel=False, lora_qkv_kernel=False,
                                lora_o_kernel=False, lora_embedding_kernel=False)))
    return load_datasets(cfg=cfg, cli_args=TrainerCliArgs())


def _train(config_path, dataset_meta):
    from axolotl.cli.config import load_cfg
    from axolotl.train import train

    cfg = load_cfg(str(config_path))
    _, _, trainer = train(cfg=cfg, dataset_meta=dataset_meta)
    return cfg, trainer


def _finite_losses(trainer) -> list[float]:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    return losses


def _hf_quailora_init(run_dir, tiny_model_path, name):
    """`hf-quailora init` (its entry point, in this process): an NF4 QuAILoRA start with r = 4 in `run_dir/name`."""
    from hf_quailora.scripts.init_adapter import init_adapter, make_parser

    texts = run_dir / "start-calibration.txt"
    texts.write_text("\n".join(["Calibration text for the start.", "A second line of it."] * 4))
    init_adapter(*make_parser().parse_args_and_config([
        "--model_name_or_path", tiny_model_path, "--lora_r", "4", "--calibration_dataset", str(texts),
        "--calibration_samples", "4", "--calibration_length", "16", "--show_progress", "false",
        "--output_dir", str(run_dir / name)]))
    return run_dir / name


@require_axolotl
def test_axolotl_validates_the_plugin_blocks(run_dir, tiny_model_path):
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    from hf_quailora.integrations.axolotl import QuAILoRAPlugin
    from hf_quailora.integrations.axolotl.plugin import quailora_callback

    texts = run_dir / "calibration.txt"
    texts.write_text("One calibration sentence.\nAnother calibration sentence.\n")
    cfg = load_cfg(str(_config(tiny_model_path, run_dir, "valid", plugins=[PLUGIN], adapter="qlora", load_in_4bit=True,
                               quailora={"calibration_samples": 4, "calibration_dataset": str(texts)},
                               dynamic_rank={"min_rank": 2, "eval_ranks": [2, R]})))
    assert cfg.quailora == {"calibration_samples": 4, "calibration_dataset": str(texts)}
    assert cfg.dynamic_rank == {"min_rank": 2, "eval_ranks": [2, R]}
    assert not any(cfg[kernel] for kernel in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"))
    assert any(isinstance(plugin, QuAILoRAPlugin) for plugin in PluginManager.get_instance().plugins.values())
    callback = quailora_callback(cfg)
    assert callback.config.calibration_samples == 4 and len(callback.calibration_dataset) == 2

    bad = [
        ({"dynamic_rank": {"update_rule": "bogus"}}, "update_rule"),
        ({"quailora": {"calibration_samples": 4}, "lora_model_dir": str(run_dir)}, "hf-quailora init"),
        ({"dynamic_rank": {}, "lora_mlp_kernel": True}, "lora_mlp_kernel: false"),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            load_cfg(str(_config(tiny_model_path, run_dir, "invalid", plugins=[PLUGIN], **settings)))


@require_axolotl
@require_bitsandbytes
def test_quailora_and_dynamic_rank_train_through_axolotls_builder(run_dir, tiny_model_path, dataset_meta):
    from axolotl.core.trainers.base import AxolotlTrainer

    from hf_quailora import QuAILoRAInitCallback
    from hf_quailora.integrations.axolotl import AxolotlDynamicRankTrainer

    path = _config(tiny_model_path, run_dir, "qlora-dynamic", plugins=[PLUGIN], adapter="qlora", load_in_4bit=True,
                   quailora={"calibration_samples": 8, "calibration_length": 16, "show_progress": False},
                   dynamic_rank={"eval_ranks": [1, 4, R]})
    cfg, trainer = _train(path, dataset_meta)

    assert isinstance(trainer, AxolotlDynamicRankTrainer) and isinstance(trainer, AxolotlTrainer)
    assert trainer.eval_data_collator is not None  # axolotl's builder keyword, taken by AxolotlTrainer
    # QuAILoRA ran (on axolotl's train batches) before the first step, so the ranks truncate at constant scaling
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QuAILoRAInitCallback))
    assert callback.report is not None and callback.report.num_tokens > 0
    assert trainer.rank_scaling == "constant" and trainer.max_rank == R
    assert [step for step, _ in trainer.rank_history] == list(range(STEPS))
    assert all(1 <= rank <= R for _, rank in trainer.rank_history)
    _finite_losses(trainer)
    # axolotl's final save, with the metadata the plugin adds beside it
    metadata = DynamicRankMetadata.load(cfg.output_dir)
    assert (metadata.quailora, metadata.rank_scaling, metadata.max_rank, metadata.quantization) == (
        True, "constant", R, "nf4")
    assert os.path.isfile(os.path.join(cfg.output_dir, "quailora_report.json"))


@require_axolotl
def test_dynamic_rank_without_quailora_keeps_dyloras_scaling_and_evaluates_every_rank(
    run_dir, tiny_model_path, dataset_meta
):
    path = _config(tiny_model_path, run_dir, "lora-dynamic", plugins=[PLUGIN],
                   dynamic_rank={"rank_seed": 5, "eval_ranks": [1, 4, R]})
    _, trainer = _train(path, dataset_meta)
    assert trainer.rank_scaling == "per_rank" and len(trainer.rank_history) == STEPS
    assert trainer.rank_settings.rank_seed == 5 and trainer.rank_settings.seed == 0  # axolotl's seed
    _finite_losses(trainer)
    # AxolotlTrainer.evaluate (its eval collator) at every rank, in one call
    metrics = trainer.evaluate(eval_dataset=dataset_meta.train_dataset)
    per_rank = [metrics[f"eval_loss@r{b}"] for b in (1, 4, R)]
    assert all(math.isfinite(loss) for loss in per_rank) and len(set(per_rank)) == 3, metrics
    assert metrics["eval_loss"] == pytest.approx(metrics[f"eval_loss@r{R}"])


@require_axolotl
@require_bitsandbytes
def test_an_hf_quailora_init_folder_trains_through_lora_model_dir_at_constant_scaling(
    run_dir, tiny_model_path, dataset_meta, caplog
):
    from safetensors.torch import load_file

    from hf_quailora import export_rank, load_dynamic_rank_adapter

    start = _hf_quailora_init(run_dir, tiny_model_path, "start")
    saved = load_file(start / "adapter_model.safetensors")

    # lora_r 8 in the YAML: the saved adapter (r = 4) governs, as axolotl documents for lora_model_dir
    path = _config(tiny_model_path, run_dir, "from-start", plugins=[PLUGIN], adapter="qlora", load_in_4bit=True,
                   lora_model_dir=str(start), dynamic_rank=True)
    with caplog.at_level("WARNING"):
        cfg, trainer = _train(path, dataset_meta)
    assert trainer.rank_scaling == "constant" and trainer.max_rank == 4
    assert not [r.getMessage() for r in caplog.records if "scaling" in r.getMessage()]
    _finite_losses(trainer)
    trained = load_file(os.path.join(cfg.output_dir, "adapter_model.safetensors"))
    assert trained.keys() == saved.keys()
    assert any(not torch.equal(trained[key], saved[key]) for key in saved)  # trained from the start, not replaced
    metadata = json.loads((run_dir / "from-start" / METADATA_FILE).read_text())
    assert (metadata["quailora"], metadata["rank_scaling"], metadata["max_rank"]) == (True, "constant", 4)
    # ... so hf_quailora's readers take axolotl's output as a dynamic-rank adapter: load it, export rank 2
    loaded = load_dynamic_rank_adapter(tiny_model_path, cfg.output_dir)
    assert (loaded.rank_scaling, loaded.max_rank) == ("constant", 4)
    export_rank(loaded.model, 2, str(run_dir / "from-start-r2"))
    exported = DynamicRankMetadata.load(run_dir / "from-start-r2")
    assert (exported.exported_rank, exported.rank_scaling, exported.quailora) == (2, "constant", True)


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: axolotl's CLI entry in each process of a torchrun launch (tests/scripts/axolotl_ddp.py says what
# a CPU needs), DDP over gloo

CPU_DEVICE_MAP = {"max_memory": {"cpu": "4GiB"}}  # else axolotl maps each process to CUDA device LOCAL_RANK


def _axolotl_processes(config_path, processes: int) -> list[dict]:
    """`axolotl train config_path` in `processes` CPU processes; each process's probe (tests/scripts/axolotl_probe.py).

    A process left waiting in a collective would hang the test: the timeout ends it as a failure.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(29400 + processes + os.getpid() % 1000), os.path.join(SCRIPTS_DIR, "axolotl_ddp.py"),
               str(config_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    output_dir = config_path.parent / config_path.stem  # `_config` writes run_dir/name.yml with output_dir run_dir/name
    probes = [torch.load(output_dir / f"probe-{process}.pt") for process in range(processes)]
    for probe in probes:  # one DDP run: each process its share of the batches, the factors wrapped by DDP
        assert (probe["world"], probe["args_world"]) == (processes, processes), probe["world"]
        if processes > 1:
            assert (probe["parallel_mode"], probe["wrapped"]) == ("distributed", "DistributedDataParallel"), probe
    return probes


def _same_on_every_process(probes) -> None:
    first = probes[0]
    for probe in probes[1:]:
        assert probe["rank_history"] == first["rank_history"] and probe["rank_scaling"] == first["rank_scaling"]
        for key in ("init", "final"):
            for name, value in first[key].items():
                assert torch.equal(value, probe[key][name]), (key, name)
    assert len(first["rank_history"]) == STEPS and all(1 <= rank <= first["max_rank"] for _, rank in
                                                       first["rank_history"])
    assert any(not torch.equal(first["final"][name], value) for name, value in first["init"].items())  # trained


@require_axolotl
@require_bitsandbytes
def test_quailora_block_and_dynamic_rank_on_two_processes_equal_one_process(run_dir, tiny_model_path):
    # every train batch calibrates (64 samples > the 24 rows): each process its half, so both see what one sees
    settings = dict(plugins=[PLUGIN, PROBE], adapter="qlora", load_in_4bit=True, **CPU_DEVICE_MAP,
                    quailora={"calibration_samples": 64, "calibration_length": 32, "show_progress": False},
                    dynamic_rank={"eval_ranks": [1, R]})
    two = _axolotl_processes(_config(tiny_model_path, run_dir, "ddp-quailora", **settings), 2)
    one = _axolotl_processes(_config(tiny_model_path, run_dir, "one-quailora", **settings), 1)

    assert 2 * two[0]["batches"] == one[0]["batches"]  # half of axolotl's train batches on each process ...
    assert two[0]["tokens"] == two[1]["tokens"] == one[0]["tokens"] > 0  # ... and all of them in the init
    _same_on_every_process(two)
    # the init: identical on both processes, equal to one process (fp32 factors: up to the order of the sums)
    assert any(value.abs().sum() > 0 for name, value in two[0]["init"].items() if "lora_B" in name)  # not B = 0
    for name, value in two[0]["init"].items():
        torch.testing.assert_close(value, one[0]["init"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert (two[0]["rank_scaling"], two[0]["max_rank"]) == ("constant", R)
    # axolotl's final save (process 0) with the metadata beside it
    metadata = DynamicRankMetadata.load(run_dir / "ddp-quailora")
    assert (metadata.quailora, metadata.rank_scaling, metadata.max_rank, metadata.quantization) == (
        True, "constant", R, "nf4")
    _assert_saved_factors(run_dir / "ddp-quailora", two[0]["final"])


def _assert_saved_factors(output_dir, factors) -> None:
    from safetensors.torch import load_file

    saved = load_file(output_dir / "adapter_model.safetensors")
    assert len(saved) == len(factors)
    for name, value in factors.items():
        torch.testing.assert_close(saved[name.replace(".default", "")].float(), value, rtol=0, atol=0, msg=name)


@require_axolotl
@require_bitsandbytes
def test_an_hf_quailora_init_folder_trains_through_lora_model_dir_on_two_processes(run_dir, tiny_model_path):
    start = _hf_quailora_init(run_dir, tiny_model_path, "ddp-start")
    path = _config(tiny_model_path, run_dir, "ddp-from-start", plugins=[PLUGIN, PROBE], adapter="qlora",
                   load_in_4bit=True, lora_model_dir=str(start), dynamic_rank=True, **CPU_DEVICE_MAP)
    probes = _axolotl_processes(path, 2)

    _same_on_every_process(probes)
    _assert_saved_factors(start, probes[0]["init"])  # both processes started from the folder's factors
    assert (probes[0]["rank_scaling"], probes[0]["max_rank"]) == ("constant", 4)
    metadata = json.loads((run_dir / "ddp-from-start" / METADATA_FILE).read_text())
    assert (metadata["quailora"], metadata["rank_scaling"], metadata["max_rank"]) == (True, "constant", 4)
    _assert_saved_factors(run_dir / "ddp-from-start", probes[0]["final"])


@pytest.mark.skipif(HAS_AXOLOTL, reason="checks the error without axolotl; with it, see the test below")
def test_without_axolotl_the_plugin_names_what_to_install():
    import hf_quailora.integrations.axolotl as integration

    with pytest.raises(ImportError, match="pip install axolotl"):
        integration.QuAILoRAPlugin


@require_axolotl
def test_hf_quailora_and_the_integration_package_do_not_import_axolotl():
    import subprocess
    import sys

    code = ("import sys, hf_quailora, hf_quailora.integrations.axolotl as a, hf_quailora.integrations.axolotl.args; "
            "assert 'axolotl' not in sys.modules, sorted(m for m in sys.modules if m.startswith('axolotl'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


"""SoFT by depth: use_exit and the exit path per family, the exit losses of training, evaluate() per (exit, rank),
export of a sub-model, and the refusals."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch
import transformers
from peft import PeftModel

from hf_quailora import DynamicRankConfig, exit_layers, export_rank, use_exit, use_rank
from hf_quailora.dynamic_rank.exits import find_depth_path

from testing_utils import REPO_ROOT, SCRIPTS_DIR, R, make_model, make_trainer, one_thread  # noqa: F401 (autouse)


sys.path.insert(0, REPO_ROOT)
from tests.families.family_models import FAMILY_BY_NAME  # noqa: E402


EXIT_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "opt", "bloom"]


def _family_model(name, num_layers=None):
    family = FAMILY_BY_NAME[name]
    config = getattr(transformers, family.config)(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                  **family.settings)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", EXIT_FAMILIES)
def test_an_exit_is_the_shallow_model_and_its_hidden_state_gives_the_same_logits(name):
    model = _family_model(name)
    shallow = _family_model(name, num_layers=1)  # the independent reference: a 1-layer model with the same weights
    shallow.load_state_dict(model.state_dict(), strict=False)
    ids = torch.tensor([[1, 5, 9, 17, 33, 4, 8]])
    depth = find_depth_path(model)
    kept = {}
    hook = depth.layers[0].register_forward_hook(lambda m, a, out: kept.update(h=out[0] if isinstance(out, tuple)
                                                                               else out))
    with torch.no_grad(), use_exit(model, 1):
        exit_logits = model(ids).logits
    hook.remove()
    with torch.no_grad():
        expected = shallow(ids).logits
        from_hidden = depth.logits(kept["h"])  # the training path: norm, head, soft-cap
        full = model(ids).logits
    torch.testing.assert_close(exit_logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hidden, expected, rtol=1e-5, atol=1e-5)
    assert len(depth.layers) == 2 and not torch.allclose(full, expected)  # restored, and the exit differs


def test_exit_layers_turns_fractions_into_counts():
    assert exit_layers([0.25, 0.5, 0.75, 1.0], 30) == [8, 15, 23, 30]
    assert exit_layers([0.25, 0.5, 0.75, 1.0], 18) == [5, 9, 14, 18]
    assert exit_layers([0.01], 18) == [1]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        exit_layers([0.0, 0.5], 18)


def _eval_then_one_step(tiny_model_path, tiny_texts, tmp_path, **overrides):
    settings = dict(soft_ranks=[R], eval_ranks=[2, R], soft_exits=[1, 2], soft_exit_weights=[0.5, 1.0],
                    max_steps=1, per_device_train_batch_size=len(tiny_texts), optim="sgd", learning_rate=0.5)
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, **{**settings, **overrides})
    before = trainer.evaluate()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, before, {n: after[n] - weights[n] for n in weights}


def test_training_sums_the_exit_losses_and_keeps_checkpointing_and_accumulation(tiny_model_path, tiny_texts,
                                                                                tmp_path):
    trainer, metrics, delta = _eval_then_one_step(tiny_model_path, tiny_texts, tmp_path / "a")
    # evaluate(): every (exit, rank), the full depth's keys unchanged
    for key in ("eval_loss@e1r2", "eval_loss@e1r8", "eval_loss@e2r2", "eval_loss@e2r8"):
        assert key in metrics, key
    assert metrics["eval_loss@e2r8"] == metrics["eval_loss@r8"] == metrics["eval_loss"]
    assert metrics["eval_loss@e1r8"] != metrics["eval_loss@e2r8"]
    # the step's loss (hooks and the exit head) is the weighted sum of the sub-models' losses (use_exit in evaluate)
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    expected = 0.5 * metrics["eval_loss@e1r8"] + 1.0 * metrics["eval_loss@e2r8"]
    assert logged == pytest.approx(expected, rel=1e-4)
    # gradient checkpointing and two accumulation steps of half the batch give the same update
    _, _, delta_gc = _eval_then_one_step(tiny_model_path, tiny_texts, tmp_path / "b", gradient_checkpointing=True,
                                         gradient_accumulation_steps=2,
                                         per_device_train_batch_size=len(tiny_texts) // 2)
    for name in delta:
        torch.testing.assert_close(delta_gc[name], delta[name], rtol=1e-3, atol=1e-6, msg=name)
    assert any(d.abs().max() > 0 for d in delta.values())


def test_with_soft_ranks_the_loss_runs_over_the_rank_by_exit_grid(tiny_model_path, tiny_texts, tmp_path):
    trainer, metrics, _ = _eval_then_one_step(tiny_model_path, tiny_texts, tmp_path, soft_ranks=[2, R],
                                              soft_weights=[2.0, 1.0])
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    expected = sum(w_b * v_k * metrics[f"eval_loss@e{k}r{b}"] for b, w_b in ((2, 2.0), (R, 1.0))
                   for k, v_k in ((1, 0.5), (2, 1.0)))
    assert logged == pytest.approx(expected, rel=1e-4)


def test_evaluation_at_an_exit_and_rank_matches_use_exit_with_use_rank(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, eval_exits=[1], eval_ranks=[2, R])
    metrics = trainer.evaluate()
    assert "eval_loss@e1r2" in metrics and "eval_loss@e2r2" not in metrics
    batch = next(iter(trainer.get_eval_dataloader()))  # the whole eval set in one batch
    batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad(), use_rank(trainer.model, 2, rank_scaling=trainer.rank_scaling), use_exit(trainer.model, 1):
        loss = trainer.model(**batch).loss.item()
    assert metrics["eval_loss@e1r2"] == pytest.approx(loss, rel=1e-4)


def test_an_exported_exit_loads_on_a_shallow_base_and_reproduces_the_sub_model(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    export_rank(model, 4, str(tmp_path / "e1r4"), rank_scaling="per_rank", exit=1)
    ids = torch.tensor([[1, 7, 20, 41, 90, 3]])
    with torch.no_grad(), use_exit(model, 1), use_rank(model, 4, rank_scaling="per_rank"):
        expected = model(ids).logits
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_path, num_hidden_layers=1)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "e1r4"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "e1r4" / "adapter_model.safetensors"))
    assert keys and not any(".layers.1." in key for key in keys)
    from hf_quailora import DynamicRankMetadata

    assert DynamicRankMetadata.load(tmp_path / "e1r4").exported_exit == 1


def test_an_exported_gemma3_exit_loads_on_its_shallow_base_with_layer_types_cut(tiny_model_path, tmp_path):
    from hf_quailora import load_dynamic_rank_adapter
    from tests.families.family_models import build_family_model

    build_family_model(FAMILY_BY_NAME["gemma3"], transformers.AutoTokenizer.from_pretrained(tiny_model_path),
                       tmp_path / "base")  # layer_types: sliding, full
    model, _ = make_model(str(tmp_path / "base"))
    export_rank(model, 4, str(tmp_path / "e1r4"), rank_scaling="per_rank", exit=1)
    ids = torch.tensor([[1, 7, 20, 41, 90, 3, 5, 9, 11]])  # longer than the sliding window (4)
    with torch.no_grad(), use_exit(model, 1), use_rank(model, 4, rank_scaling="per_rank"):
        expected = model(ids).logits
        assert model.config.layer_types == ["sliding_attention"]
    assert model.config.layer_types == ["sliding_attention", "full_attention"]  # restored
    loaded = load_dynamic_rank_adapter(str(tmp_path / "base"), str(tmp_path / "e1r4")).model
    config = loaded.get_base_model().config
    assert (config.num_hidden_layers, config.layer_types) == (1, ["sliding_attention"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    config.save_pretrained(tmp_path / "config")  # a valid config: transformers refuses layer_types longer than L


def test_exits_under_ddp_train_alike_on_both_processes_and_as_one_process_accumulating(tiny_model_path, tmp_path):
    script = os.path.join(SCRIPTS_DIR, "dynamic_rank_ddp.py")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               script, tiny_model_path, str(tmp_path), "exits"]
    # a process that fails makes torchrun end the other; one left waiting in a collective ends at the timeout
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("dynamic_rank_ddp", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tiny_model_path, str(tmp_path), "exits")  # one process, the same micro-batches accumulated
    single, *processes = [torch.load(tmp_path / f"process-{i}.pt", weights_only=True) for i in (-1, 0, 1)]
    assert [state["world_size"] for state in (single, *processes)] == [1, 2, 2]
    for index, state in enumerate(processes):
        assert state["rank_history"] == single["rank_history"], index
        for name, weight in single["weights"].items():
            torch.testing.assert_close(state["weights"][name], weight, rtol=1e-5, atol=1e-5, msg=f"{index} {name}")
    assert any(not torch.equal(w, single["weights"][n]) for n, w in make_model(tiny_model_path)[0].named_parameters()
               if n in single["weights"])  # and training moved the factors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"soft_exits": [0, 2]}, ValueError, "at least 1"),
        ({"soft_exits": [1, 1]}, ValueError, "repeats an exit"),
        ({"soft_exits": [1.5]}, TypeError, "integer"),
        ({"soft_exit_weights": [1.0]}, ValueError, "needs `soft_exits`"),
        ({"soft_exits": [1, 2], "soft_exit_weights": [1.0]}, ValueError, "one weight per exit"),
        ({"soft_exits": [1, 2], "soft_exit_weights": [1.0, -1.0]}, ValueError, "positive"),
        ({"soft_exits": [1, 2], "torch_compile": True}, ValueError, "cannot be combined with torch_compile"),
        ({"soft_exits": [1, 2], "loss_type": "dft"}, ValueError, "loss_type"),
    ],
)
def test_the_config_refuses_bad_exits(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicRankConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **kwargs)


def test_an_exit_above_the_depth_and_an_unknown_family_are_refused_before_training(tiny_model_path, tiny_texts,
                                                                                   tmp_path):
    with pytest.raises(ValueError, match="exit 3, above the model's 2 layers"):
        make_trainer(tiny_model_path, tiny_texts, tmp_path, soft_exits=[1, 3])
    with pytest.raises(ValueError, match="above the model's 2 layers"):
        make_trainer(tiny_model_path, tiny_texts, tmp_path, eval_exits=[4])
    falcon = _family_model("falcon")
    with pytest.raises(ValueError, match=r"family 'falcon'.*ln_f"):
        find_depth_path(falcon)
    with pytest.raises(ValueError, match="family 'falcon'"):
        with use_exit(falcon, 1):
            pass


@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2: soft-capped logits
def test_the_fused_exit_head_gives_the_loss_and_gradient_of_plain_autograd(name, monkeypatch):
    from hf_quailora.dynamic_rank import exit_loss

    model = _family_model(name)
    for param in model.parameters():
        param.requires_grad_(False)
    depth = find_depth_path(model)
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 9))
    labels[0, :3] = -100
    monkeypatch.setattr(exit_loss, "EXIT_CHUNK_TOKENS", 5)  # several chunks
    fused = exit_loss.exit_nll(depth, hidden, labels)
    (grad,) = torch.autograd.grad(fused, hidden)
    logits = depth.logits(hidden[:, :-1]).reshape(-1, 64)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)

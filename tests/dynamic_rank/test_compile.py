"""Static-shape truncation (`enable_static_rank`) and `DynamicRankTrainer(torch_compile=True)`: the same numbers as
the slicing path, and one compiled graph for every rank (dynamo's counters, the `aot_eager` backend)."""

import logging

import pytest
import torch
from transformers import TrainerCallback

from hf_quailora import export_rank, use_rank
from hf_quailora.dynamic_rank.rank_mask import _MaskedLoraLinear, disable_static_rank, enable_static_rank
from hf_quailora.dynamic_rank.truncation import find_dynamic_rank_layers

from testing_utils import R, make_model, make_trainer, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def fresh_dynamo():
    """Each test starts and ends with dynamo's caches and counters empty, so other tests are unaffected."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def input_ids(seed=0, batch=2, length=12):
    return torch.randint(4, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward_and_grads(model, ids, b, rule, scaling):
    model.zero_grad(set_to_none=True)
    with use_rank(model, b, update_rule=rule, rank_scaling=scaling):
        output = model(ids, labels=ids)
        output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), grads


@pytest.mark.parametrize("rule", ["frozen", "nested"])
@pytest.mark.parametrize("scaling", ["per_rank", "constant"])
def test_masked_path_equals_slicing(tiny_model_path, rule, scaling):
    sliced, _ = make_model(tiny_model_path)
    masked, _ = make_model(tiny_model_path)
    enable_static_rank(masked)
    sliced.train(), masked.train()
    ids = input_ids()
    for b in (1, 3, R):
        logits, grads = forward_and_grads(sliced, ids, b, rule, scaling)
        masked_logits, masked_grads = forward_and_grads(masked, ids, b, rule, scaling)
        torch.testing.assert_close(masked_logits, logits, rtol=1e-6, atol=1e-6, msg=f"logits at rank {b}")
        assert masked_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(masked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=f"{name} at rank {b}")
            assert torch.equal(masked_grads[name] == 0, grad == 0), f"{name}: other components learn at rank {b}"


def test_static_rank_keeps_classes_scaling_and_restores_the_full_lora(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        full = model(ids).logits
    enable_static_rank(model)
    layers = find_dynamic_rank_layers(model)
    layer = next(iter(layers.values()))
    scaling = layer.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)  # no rank in use: peft's own LoRA
        with use_rank(model, 2, rank_scaling="per_rank"):
            assert layer.scaling["default"] == scaling and type(layer.lora_A["default"]) is _MaskedLoraLinear
            at_2 = model(ids).logits
            with use_rank(model, 5):
                model(ids)
            torch.testing.assert_close(model(ids).logits, at_2, rtol=0, atol=0)  # the outer rank is back
            with pytest.raises(RuntimeError, match="export_rank"):
                layer.merge()
        torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)
    # export reads the weights: the same adapter as from the slicing path
    export_rank(model, 2, str(tmp_path / "masked"), rank_scaling="per_rank")
    disable_static_rank(model)
    assert all(type(layer.lora_A["default"]) is torch.nn.Linear for layer in layers.values())
    assert "merge" not in layer.__dict__
    export_rank(model, 2, str(tmp_path / "sliced"), rank_scaling="per_rank")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "masked" / name).read_bytes() == (tmp_path / "sliced" / name).read_bytes(), name


def test_static_rank_recomputes_at_the_same_rank_under_gradient_checkpointing(tiny_model_path):
    ids = input_ids()
    grads = {}
    for checkpointing in (False, True):
        model, _ = make_model(tiny_model_path)
        enable_static_rank(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        _, grads[checkpointing] = forward_and_grads(model, ids, 3, "frozen", "per_rank")
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_model_runs_every_rank_in_one_graph(tiny_model_path, fresh_dynamo):
    sliced, _ = make_model(tiny_model_path)
    model, _ = make_model(tiny_model_path)
    enable_static_rank(model)
    compiled = torch.compile(model, backend="aot_eager")
    ids = input_ids()
    model.train()
    with use_rank(model, R, update_rule="frozen", rank_scaling="per_rank"):  # warm-up: training, then evaluation
        compiled(ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad(), use_rank(model, R, rank_scaling="per_rank"):
        compiled(ids)
    graphs = fresh_dynamo["stats"]["unique_graphs"]
    for b in [3, 7, 1, 5, 2, 8, 6, 4]:
        for rule, scaling in (("frozen", "per_rank"), ("nested", "constant")):
            model.train()
            with use_rank(model, b, update_rule=rule, rank_scaling=scaling):
                loss = compiled(ids, labels=ids).loss
                loss.backward()
            with use_rank(sliced, b, update_rule=rule, rank_scaling=scaling):
                expected = sliced(ids, labels=ids).loss
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=f"rank {b}, {rule}, {scaling}")
        model.eval()
        with torch.no_grad(), use_rank(model, b, rank_scaling="per_rank"):
            compiled(ids)
    assert fresh_dynamo["stats"]["unique_graphs"] == graphs, "a rank, rule or scaling recompiled the model"
    assert "recompile_limit" not in str(dict(fresh_dynamo["graph_break"]))


class CountGraphs(TrainerCallback):
    """Dynamo's count of compiled graphs after the first evaluation (the warm-up: a training and an eval graph)."""

    def __init__(self, counters):
        self.counters, self.after_warm_up = counters, None

    def on_evaluate(self, args, state, control, **kwargs):
        if self.after_warm_up is None:
            self.after_warm_up = self.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("soft", [False, True])
def test_compiled_trainer_does_not_recompile_after_warm_up(tiny_model_path, tiny_texts, tmp_path, fresh_dynamo, soft):
    counter = CountGraphs(fresh_dynamo)
    ranks = [1, 2, 3, 4, 5, 6, 7, 8]
    overrides = dict(soft_ranks=[2, 5, 8]) if soft else {}
    trainer = make_trainer(
        tiny_model_path, tiny_texts, tmp_path, callbacks=[counter], torch_compile=True,
        torch_compile_backend="aot_eager", max_steps=len(ranks) + 1, eval_strategy="steps", eval_steps=1,
        eval_ranks=[1, 3, 8], **overrides,
    )
    draws = iter([R, *ranks])
    trainer.rank_sampler.sample = lambda: next(draws)  # step 1 warms up; then every rank once
    trainer.train()
    assert type(next(iter(find_dynamic_rank_layers(trainer.model).values())).lora_A["default"]) is _MaskedLoraLinear
    if not soft:
        assert [rank for _, rank in trainer.rank_history] == [R, *ranks]
    assert counter.after_warm_up is not None and counter.after_warm_up >= 1
    assert fresh_dynamo["stats"]["unique_graphs"] == counter.after_warm_up, "training or evaluation recompiled"
    metrics = trainer.evaluate()
    assert {"eval_loss@r1", "eval_loss@r3", "eval_loss@r8"} <= metrics.keys()
    assert fresh_dynamo["stats"]["unique_graphs"] == counter.after_warm_up


def test_recompile_limit_fallback_is_reported_once_in_plain_words(tiny_model_path, tiny_texts, tmp_path, fresh_dynamo,
                                                                  caplog, monkeypatch):
    make_trainer(tiny_model_path, tiny_texts, tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)

    class Box:
        mode = "a"

    @torch.compile(backend="eager")
    def double(x):
        return x * 2 if Box.mode == "a" else x * 3

    with caplog.at_level(logging.WARNING, logger="hf_quailora.dynamic_rank.rank_mask"):
        for mode in ("a", "b", "c", "d"):  # a string is always guarded on: every new one recompiles
            Box.mode = mode
            double(torch.ones(2))
    ours = [r for r in caplog.records if r.name == "hf_quailora.dynamic_rank.rank_mask" and "recompile limit" in r.msg]
    assert len(ours) == 1, [r.msg for r in caplog.records]
    assert "uncompiled" in ours[0].getMessage()


def test_static_rank_trains_like_slicing_with_gradient_accumulation(tiny_model_path, tiny_texts, tmp_path):
    weights = {}
    for static in (False, True):
        trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path / str(static), max_steps=3,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2)
        if static:
            enable_static_rank(trainer.model)
        trainer.train()
        weights[static] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        ranks = [rank for _, rank in trainer.rank_history]
    assert len(set(ranks)) > 1
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6, msg=name)

"""Faults under DynamicRankTrainer: a full disk during a checkpoint or save, a non-finite loss or gradient, and two
runs on one output folder (see hf_quailora/dynamic_rank/faults.py and docs/limits.md, "Faults")."""

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from hf_quailora import DynamicRankConfig
from hf_quailora._io_utils import DiskFullError
from hf_quailora.dynamic_rank.faults import LOCK_FILE, OutputDirInUseError, OutputDirLock

from testing_utils import REPO_ROOT, make_model, make_trainer, one_thread, snapshot  # noqa: F401 (autouse fixture)


def leftovers(folder):
    return sorted(entry.name for entry in Path(folder).iterdir() if entry.name.startswith("."))


def assert_loads(tiny_model_path, folder):
    base, _ = make_model(tiny_model_path, seed=1)
    PeftModel.from_pretrained(base.get_base_model(), folder)


# A full disk


def test_a_checkpoint_that_fills_the_disk_is_removed_and_the_earlier_one_stays(tiny_model_path, tiny_texts, tmp_path,
                                                                               monkeypatch):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):  # the adapter is already written
            Path(path).write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, save_strategy="steps", save_steps=2)
    message = "No space left on device writing .*checkpoint-4: it needs about"
    with pytest.raises(DiskFullError, match=message) as caught:
        trainer.train()
    assert caught.value.needed_bytes >= sum(f.stat().st_size for f in (tmp_path / "checkpoint-2").iterdir())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"] and leftovers(tmp_path) == []
    assert (tmp_path / "checkpoint-2" / "dynamic_rank_state.pt").is_file()
    assert_loads(tiny_model_path, tmp_path / "checkpoint-2")


def test_save_model_on_a_full_disk_keeps_the_earlier_adapter(tiny_model_path, tiny_texts, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path / "run", max_steps=1)
    trainer.save_model(str(tmp_path / "adapter"))
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def save_file(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    trainer.train()  # the adapter changes
    monkeypatch.setattr("peft.peft_model.safe_save_file", save_file)  # what PeftModel.save_pretrained calls
    with pytest.raises(DiskFullError, match="adapter: it needs about"):
        trainer.save_model(str(tmp_path / "adapter"))
    monkeypatch.undo()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "adapter") == []
    assert_loads(tiny_model_path, tmp_path / "adapter")


# A non-finite loss or gradient


class Poison(TrainerCallback):
    """From global_step `step` on, makes the loss (`what="loss"`) or one LoRA gradient (`"grad"`) NaN."""

    def __init__(self, step, what="loss"):
        self.step, self.what, self.trainer, self.before = step, what, None, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step < self.step:
            return
        self.before = self.before or snapshot(model)
        parameter = next(p for name, p in model.named_parameters() if "lora_A" in name)
        if self.what == "grad" and not hasattr(self, "_hooked"):
            self._hooked = parameter.register_hook(lambda grad: grad * float("nan"))
        if self.what == "loss" and not hasattr(self, "_hooked"):
            self._hooked = model.get_base_model().model.norm.register_forward_hook(
                lambda module, args, output: output * float("nan") if module.training else output)


@pytest.mark.parametrize(("what", "match"), [("loss", "the loss was nan at rank"),
                                             ("grad", "the gradient of the trainable parameters was not finite")])
def test_a_non_finite_step_stops_before_the_optimizer_naming_the_step_and_rank(tiny_model_path, tiny_texts, tmp_path,
                                                                                what, match):
    poison = Poison(2, what)
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, callbacks=[poison], save_strategy="steps",
                           save_steps=2)
    with pytest.raises(FloatingPointError, match=match) as caught:
        trainer.train()
    rank = trainer.rank_history[-1][1]
    assert trainer.rank_history[-1][0] == 2
    assert f"Optimizer step 3 (rank plan: r{rank})" in str(caught.value)
    assert f"{tmp_path / 'checkpoint-2'}, is intact" in str(caught.value)
    after = snapshot(trainer.model)
    for name, value in poison.before.items():  # the step was not applied
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert_loads(tiny_model_path, tmp_path / "checkpoint-2")
    assert not (tmp_path / LOCK_FILE).exists()


def test_skip_drops_non_finite_steps_with_a_warning(tiny_model_path, tiny_texts, tmp_path, caplog):
    poison = Poison(0, "loss")
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, callbacks=[poison], nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="hf_quailora.dynamic_rank.faults"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert sum("Skipping the step" in record.message for record in caplog.records) == 4
    after = snapshot(trainer.model)
    for name, value in poison.before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def test_soft_names_every_rank_of_the_plan(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, callbacks=[Poison(0)], soft_ranks=[2, 8],
                           soft_weights=[0.5, 1.0])
    with pytest.raises(FloatingPointError, match=r"Optimizer step 1 \(rank plan: r2 \(weight 0.5\), r8\): the loss "
                                                 r"was nan at rank 2, nan at rank 8"):
        trainer.train()


def test_config_checks_nonfinite(tmp_path):
    with pytest.raises(ValueError, match="`nonfinite` must be one of"):
        DynamicRankConfig(output_dir=str(tmp_path), report_to="none", nonfinite="ignore")


# Two runs, one output folder


class StartAnotherRun(TrainerCallback):
    def __init__(self, other):
        self.other, self.error = other, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            try:
                self.other.train()
            except OutputDirInUseError as error:
                self.error = error


def test_a_second_run_on_a_live_runs_folder_is_refused_and_the_lock_released(tiny_model_path, tiny_texts, tmp_path):
    second = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=1)
    starter = StartAnotherRun(second)
    first = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=2, callbacks=[starter])
    first.train()
    assert starter.error is not None and second.state.global_step == 0
    message = str(starter.error)
    assert f"output_dir {tmp_path} is in use" in message
    assert f"process {os.getpid()} on host {socket.gethostname()}" in message
    assert not (tmp_path / LOCK_FILE).exists()
    second.train()  # once the first has ended
    assert second.state.global_step == 1


def run_holder(folder, then):
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from hf_quailora.dynamic_rank.faults import OutputDirLock
        OutputDirLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        {then}
    """)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_model_path, tiny_texts, tmp_path, caplog):
    process = run_holder(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert (tmp_path / LOCK_FILE).is_file()
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_quailora.dynamic_rank.faults"):
        trainer.train()
    assert any(f"process {process.pid} on host" in record.message and "no longer running" in record.message
               for record in caplog.records)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_holding_the_lock_is_named(tmp_path):
    process = run_holder(tmp_path / "out", "time.sleep(120)")
    try:
        with pytest.raises(OutputDirInUseError, match=f"process {process.pid} on host {socket.gethostname()}"):
            OutputDirLock(tmp_path / "out").acquire()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    lock = OutputDirLock(tmp_path / "out").acquire()  # the OS released it with the process
    lock.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()

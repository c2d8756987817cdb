"""A SIGKILL fault-injection harness: a QuAILoRA-initialised `DynamicRankTrainer` run on a tiny model, killed at a
named moment, resumed from its last checkpoint, and checked (docs/limits.md, "Faults").

One attempt is one forked process (the parent has imported torch, transformers, trl, peft and lm-eval once, so an
attempt starts in well under a second). The run: the QuAILoRA init (`init`), `MAX_STEPS` optimizer steps (`step`),
a checkpoint every `SAVE_STEPS` steps with `save_total_limit=2` (`checkpoint`), an lm-eval sweep at train end
(`sweep`), then `save_model` into `final/` (`save_model`) and `export_rank` of rank `EXPORT_RANK` into
`rank-2/` (`export`). A plan `{"moment": m, "occurrence": k, "tick": j}` kills the attempt at the j-th tick of the
k-th time moment m runs. Ticks are the points where the process can change what is on disk or compute:
before and after every file operation (`open` for writing, `os.replace`, `os.rename`, `os.mkdir`, `os.makedirs`,
`os.unlink`, `shutil.rmtree`) and every module's forward. The hooks live here (a subclass of the trainer and the
callbacks, stdlib wrappers), none in the library.

After each kill `check_disk` looks at every folder of the run: a `checkpoint-N` must resume (every file present and
loadable), `final/` and `rank-2/` must load as complete adapters, `rank_sweep/results.json` must parse; a
checkpoint the run had finished must still be there (or a newer one, when `save_total_limit` rotated it). The last
attempt of a trial runs to the end; its adapters and rank sequence must equal those of a run that never stopped,
bit for bit, and a resumed attempt must not have recomputed the QuAILoRA init.

Example:

```python
harness = Harness(model_dir, work_dir)
reference = harness.reference()  # an uninterrupted run: its ticks per moment, its adapters
outcome = harness.trial([{"moment": "checkpoint", "occurrence": 1, "tick": 7}], "trial-0")
assert outcome["unloadable"] == [] and outcome["lost"] == [] and outcome["equal"]
```
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from conftest import TINY_TEXTS  # tests/ is on sys.path (pytest, bench/bench_faults.py)


MOMENTS = ("step", "checkpoint", "save_model", "export", "init", "sweep")
MAX_STEPS, SAVE_STEPS, EXPORT_RANK = 6, 2, 2
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "dynamic_rank_state.pt",
                    "adapter_config.json", "adapter_model.safetensors", "dynamic_rank.json")
TEXTS = TINY_TEXTS  # the tiny tokenizer of conftest.py was trained on them


# ---------------------------------------------------------------------------------------------------------------------
# Inside the attempt: where the moments begin and end, and the ticks that may kill


class _Injector:
    """Counts ticks inside the current moment and SIGKILLs this process at the planned one; logs to `log_fd`."""

    def __init__(self, plan: dict | None, log_path: str):
        self.plan, self.moment, self.ticks = plan, None, 0
        self.occurrences: dict[str, int] = {}
        self.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def log(self, **event) -> None:
        event["t"] = round(time.monotonic(), 3)
        os.write(self.fd, (json.dumps(event) + "\n").encode())  # unbuffered: a kill loses nothing logged

    def begin(self, moment: str) -> None:
        self.occurrences[moment] = self.occurrences.get(moment, 0) + 1
        self.moment, self.ticks = moment, 0
        self.log(event="begin", moment=moment, occurrence=self.occurrences[moment])

    def end(self) -> None:
        self.log(event="end", moment=self.moment, occurrence=self.occurrences[self.moment], ticks=self.ticks)
        self.moment = None

    def tick(self) -> None:
        if self.moment is None:
            return
        self.ticks += 1
        plan = self.plan
        if (plan and plan["moment"] == self.moment and plan["occurrence"] == self.occurrences[self.moment]
                and plan["tick"] == self.ticks):
            self.log(event="kill", moment=self.moment, occurrence=plan["occurrence"], tick=self.ticks)
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap_file_operations(injector: _Injector) -> None:
    """Tick before and after every call that writes, renames or removes files (in this forked process only)."""
    def wrap(owner, name, writes=lambda *a, **k: True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            hit = writes(*args, **kwargs)
            if hit:
                injector.tick()
            result = real(*args, **kwargs)
            if hit:
                injector.tick()
            return result

        setattr(owner, name, wrapper)

    def opens_for_writing(file, mode="r", *args, **kwargs):
        return isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")

    wrap(builtins, "open", opens_for_writing)
    for name in ("replace", "rename", "mkdir", "makedirs", "unlink", "remove"):
        wrap(os, name)
    wrap(shutil, "rmtree")


def _moment(injector: _Injector, moment: str, fn, *args, **kwargs):
    injector.begin(moment)
    try:
        return fn(*args, **kwargs)
    finally:
        injector.end()


def _build(model_dir: str, out: str, injector: _Injector, **overrides):
    """The trainer of one attempt, with the moments marked: subclasses of the library's classes, hooks on modules."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer, QuAILoRAInitCallback, RankSweepCallback
    from hf_quailora.quantization import load_quantized_model

    class Init(QuAILoRAInitCallback):
        def _initialise(self, *args):
            injector.log(event="init_ran")
            return _moment(injector, "init", super()._initialise, *args)

    class Sweep(RankSweepCallback):
        def _sweep(self, args, state):
            return _moment(injector, "sweep", super()._sweep, args, state)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            injector.begin("step")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            injector.tick()

        def on_step_end(self, args, state, control, **kwargs):
            injector.end()

    class Trainer(DynamicRankTrainer):
        def _save_checkpoint(self, model, trial):
            _moment(injector, "checkpoint", super()._save_checkpoint, model, trial)
            injector.log(event="checkpoint_done", step=self.state.global_step)

    model, tokenizer = load_quantized_model(model_dir, quantization="nf4")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    for module in model.modules():
        module.register_forward_pre_hook(lambda *_: injector.tick())
    settings = dict(output_dir=out, max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2,
                    report_to="none", use_cpu=True, max_length=32, seed=0, min_rank=1, rank_scaling="constant",
                    dataloader_num_workers=0, bf16=False)
    args = DynamicRankConfig(**{**settings, **overrides})
    data = Dataset.from_dict({"text": TEXTS})
    init = Init(calibration_dataset=TEXTS[:8], calibration_samples=8, calibration_length=32)
    trainer = Trainer(model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[init, Steps()])
    trainer.add_callback(Sweep(trainer, ranks=[2], tasks="quailora_wiki_ppl", limit=1, max_length=256,
                               batch_size=2))
    return trainer, init


def _attempt(model_dir: str, out: str, plan: dict | None, log_path: str) -> None:
    """One attempt: resume from the last checkpoint when there is one, finish, save, export; record the outcome."""
    from transformers.trainer_utils import get_last_checkpoint

    from hf_quailora import export_rank

    torch.set_num_threads(1)
    injector = _Injector(plan, log_path)
    _wrap_file_operations(injector)
    trainer, init = _build(model_dir, out, injector)
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    injector.log(event="start", resume=last)
    trainer.train(resume_from_checkpoint=last)
    _moment(injector, "save_model", trainer.save_model, os.path.join(out, "final"))
    _moment(injector, "export", export_rank, trainer.model, EXPORT_RANK, os.path.join(out, f"rank-{EXPORT_RANK}"),
            overwrite=True)
    injector.log(event="done", rank_history=trainer.rank_history, init_ran=init.report is not None)


def warm_imports() -> None:
    """Import once, before the forks, what every attempt would otherwise import again (lm-eval, matplotlib)."""
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    import matplotlib.pyplot  # noqa: F401 (the sweep's results.png)

    import hf_quailora.evaluation.lm_eval_bridge  # noqa: F401


def run_attempt(model_dir: str, out: str, plan: dict | None, log_path: str) -> int:
    """Fork, run one attempt in the child; return its wait status as a signal number (9: killed) or -exit code."""
    warm_imports()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller (pytest, the bench loop)
        code = 1
        try:
            _attempt(model_dir, out, plan, log_path)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def read_log(log_path: str) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# After an attempt: what is on disk


def _adapter_problem(folder: Path, expected: dict[str, tuple] | None) -> str | None:
    """Why `folder` does not load as a complete adapter (`None`: it does); `expected`: the tensor shapes it must hold."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        json.loads((folder / "dynamic_rank.json").read_text())
    except Exception as error:  # any failure to read is the finding
        return f"{type(error).__name__}: {error}"
    if expected is not None and {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        return "its tensors are not the expected ones"
    return None if config.get("r") else "adapter_config.json has no r"


def _checkpoint_problem(folder: Path, expected) -> str | None:
    """Why `folder` would not resume (`None`: every file is there and loads)."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {missing}"
    try:
        json.loads((folder / "trainer_state.json").read_text())
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "dynamic_rank_state.pt"):
            torch.load(folder / name, weights_only=False)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return _adapter_problem(folder, expected)


def check_disk(out: str, shapes: dict) -> list[str]:
    """Every folder of the run that is not hidden (a temporary one) loads completely: the problems found."""
    problems = []
    for folder in sorted(Path(out).iterdir()) if os.path.isdir(out) else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if folder.name.startswith("checkpoint-"):
            problem = _checkpoint_problem(folder, shapes["max"])
        elif folder.name in ("final", f"rank-{EXPORT_RANK}"):
            problem = _adapter_problem(folder, shapes["max" if folder.name == "final" else "export"])
        elif folder.name == "rank_sweep":
            problem = None if not (folder / "results.json").exists() else _json_problem(folder / "results.json")
        else:
            problem = "an unexpected folder"
        if problem:
            problems.append(f"{folder.name}: {problem}")
    return problems


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def complete_checkpoints(out: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*") if p.is_dir())


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Trials


class Harness:
    """Runs the uninterrupted reference once, then trials: attempts killed by plan, then one that finishes.

    Args:
        model_dir (`str`): the tiny model (nf4-quantizable, a tokenizer beside it).
        work_dir (`str`): where each run gets its own folder.
    """

    def __init__(self, model_dir: str, work_dir: str):
        self.model_dir, self.work_dir = model_dir, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ref: dict | None = None

    def reference(self) -> dict:
        """The run that never stops: its ticks per (moment, occurrence), rank sequence and adapters."""
        out, log = self.work_dir / "reference", self.work_dir / "reference.log"
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
        status = run_attempt(self.model_dir, str(out), None, str(log))
        if status != 0:
            raise RuntimeError(f"the uninterrupted reference run failed ({status}); see its traceback above")
        events = read_log(str(log))
        ticks = {(e["moment"], e["occurrence"]): e["ticks"] for e in events if e["event"] == "end"}
        final, export = adapter_tensors(out / "final"), adapter_tensors(out / f"rank-{EXPORT_RANK}")
        self.ref = {"ticks": ticks, "rank_history": events[-1]["rank_history"], "final": final, "export": export,
                    "shapes": {"max": {k: tuple(v.shape) for k, v in final.items()},
                               "export": {k: tuple(v.shape) for k, v in export.items()}}}
        return self.ref

    def draw_plan(self, rng, moment: str, occurrence: int | None = None) -> dict:
        """A kill at a uniformly drawn occurrence of `moment` in the reference run (or the given one), at a uniformly
        drawn tick of it."""
        keys = sorted(key for key in self.ref["ticks"] if key[0] == moment and self.ref["ticks"][key] > 0)
        occurrence = keys[rng.randrange(len(keys))][1] if occurrence is None else occurrence
        return {"moment": moment, "occurrence": occurrence, "tick": rng.randint(1, self.ref["ticks"][moment, occurrence])}

    def trial(self, plans: list[dict], name: str) -> dict:
        """Attempts killed by `plans` (each resumed from the last checkpoint), then one that runs to the end."""
        out, log = self.work_dir / name, str(self.work_dir / f"{name}.log")
        shutil.rmtree(out, ignore_errors=True)
        Path(log).unlink(missing_ok=True)
        kills, unloadable, lost, finished = [], [], [], set()
        for plan in [*plans, None]:
            status = run_attempt(self.model_dir, str(out), plan, log)
            events = read_log(log)
            finished |= {e["step"] for e in events if e["event"] == "checkpoint_done"}
            found = check_disk(str(out), self.ref["shapes"])
            on_disk = complete_checkpoints(str(out))
            gone = [f"checkpoint-{max(finished)}"] if finished and not any(n >= max(finished) for n in on_disk) else []
            unloadable += [f"after {plan}: {p}" for p in found]
            lost += [f"after {plan}: {p}" for p in gone]
            if plan is not None and status == signal.SIGKILL:
                kill = next(e for e in reversed(events) if e["event"] == "kill")
                kills.append({**kill, "unloadable": found, "lost": gone})
        return self._compare(out, read_log(log), kills, unloadable, lost, finished=status == 0)

    def _compare(self, out: Path, events: list[dict], kills, unloadable, lost, finished: bool) -> dict:
        """The outcome of a trial; `finished`: whether its last attempt ran to the end (else it could not resume)."""
        if not finished:
            return {"kills": kills, "unloadable": unloadable, "lost": lost, "init_recomputed": 0, "finished": False,
                    "equal": False, "same_ranks": False}
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        recomputed = sum(1 for i in starts if events[i]["resume"] and any(
            e["event"] == "init_ran" for e in events[i:next((j for j in starts if j > i), len(events))]))
        done = events[-1]
        return {"kills": kills, "unloadable": unloadable, "lost": lost, "init_recomputed": recomputed, "finished": True,
                "equal": same_tensors(adapter_tensors(out / "final"), self.ref["final"])
                and same_tensors(adapter_tensors(out / f"rank-{EXPORT_RANK}"), self.ref["export"]),
                "same_ranks": done["rank_history"] == self.ref["rank_history"]}

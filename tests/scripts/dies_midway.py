"""One process of a two-process run (gloo, CPU) SIGKILLs itself at a named point; the survivor must stop with an error.

    python tests/scripts/dies_midway.py MODEL_DIR OUT_DIR POINT [POINT ...]

POINT is `gram` (the all-reduce of the QuAILoRA init's Gram matrices), `rank` (the broadcast of the rank drawn for
step 2), `checkpoint` (process 1 has written its part of checkpoint-2 and dies before process 0 publishes it),
`sweep` (the lm-eval sweep at train end) or `rank_stuck` (process 1 stops with SIGSTOP instead of dying at
the rank broadcast: alive but stuck, its connections stay open, so process 0 waits until the process group's timeout,
set to STUCK_TIMEOUT_S here). For each point this launcher, which imports torch, transformers,
trl, peft and lm-eval once, forks two processes with torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`), so that nothing but the library stands between the survivor and a hang (under
`torchrun` itself the agent would SIGTERM the survivor as soon as the other process died). Process 1 kills itself when
it reaches the point; process 0 runs on. Writes `OUT_DIR/POINT.json`: process 0's exit code, its error, the seconds
from the kill to its exit.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
import traceback


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEADLINE_S = 60  # process 0 still running this long after the kill: a hang, killed and reported
STUCK_TIMEOUT_S = 5  # the process group's timeout: how long a process waits for one alive but stuck (`rank_stuck`)


def _kill_at(point: str, injector) -> None:
    """Wrap the collectives so that process 1 SIGKILLs itself at `point` (this process only)."""
    import torch.distributed as dist

    def die():
        injector.log(event="kill", moment=point)
        os.kill(os.getpid(), signal.SIGSTOP if point == "rank_stuck" else signal.SIGKILL)

    real_all_reduce, real_broadcast, real_barrier = dist.all_reduce, dist.broadcast, dist.barrier

    def all_reduce(tensor, *args, **kwargs):
        if point == "gram" and injector.moment == "init" and tensor.dim() == 2:  # a Gram matrix
            die()
        return real_all_reduce(tensor, *args, **kwargs)

    def broadcast(tensor, *args, **kwargs):
        if point in ("rank", "rank_stuck") and injector.moment == "step" and injector.occurrences.get("step") == 2:
            die()
        return real_broadcast(tensor, *args, **kwargs)

    def barrier(*args, **kwargs):
        if point == "checkpoint" and injector.moment == "checkpoint" and injector.occurrences["checkpoint"] == 2:
            die()  # it has written its part of checkpoint-2 into the staging folder
        return real_barrier(*args, **kwargs)

    dist.all_reduce, dist.broadcast, dist.barrier = all_reduce, broadcast, barrier
    if point == "sweep":
        begin = injector.begin

        def begin_then_die(moment):
            begin(moment)
            if moment == "sweep":
                die()

        injector.begin = begin_then_die


def _process(rank: int, port: int, model_dir: str, out: str, point: str) -> None:
    import fault_harness
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # On a CPU (`use_cpu=True`) transformers does not pass `ddp_timeout` to the process group: set the timeout here
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=STUCK_TIMEOUT_S))
    injector = fault_harness._Injector(None, os.path.join(out, f"{point}-{rank}.log"))
    if rank == 1:
        _kill_at(point, injector)
    saving = dict(save_strategy="steps", save_steps=1) if point == "checkpoint" else dict(save_strategy="no")
    trainer, _ = fault_harness._build(model_dir, os.path.join(out, point), injector, ddp_backend="gloo", max_steps=2,
                                      **saving)
    trainer.train()
    injector.log(event="done")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fork(rank: int, port: int, model_dir: str, out: str, point: str) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _process(rank, port, model_dir, out, point)
        except BaseException as error:
            code = 1
            with open(os.path.join(out, f"{point}-{rank}.error"), "w") as file:
                file.write(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        finally:
            os._exit(code)
    return pid


def _killed_at(log_path: str) -> float | None:
    """When process 1 logged its kill (or stop): `time.monotonic()` of that moment, shared by the processes."""
    if not os.path.exists(log_path):
        return None
    kills = [json.loads(line)["t"] for line in open(log_path) if '"kill"' in line]
    return kills[0] if kills else None


def run_point(model_dir: str, out: str, point: str) -> dict:
    """Fork the two processes; wait for process 0 (at most DEADLINE_S after process 1 died or stopped); report it."""
    port = _free_port()
    survivor, victim = _fork(0, port, model_dir, out, point), _fork(1, port, model_dir, out, point)
    victim_log, status0, killed = os.path.join(out, f"{point}-1.log"), None, None
    while killed is None or time.monotonic() - killed < DEADLINE_S:
        pid, status = os.waitpid(survivor, os.WNOHANG)
        killed = killed or _killed_at(victim_log)
        if pid:
            status0, ended = status, time.monotonic()
            break
        time.sleep(0.05)
    else:
        os.kill(survivor, signal.SIGKILL)
        os.waitpid(survivor, 0)
        ended = time.monotonic()
    os.kill(victim, signal.SIGKILL)  # dead already, or stopped (`rank_stuck`)
    os.waitpid(victim, 0)
    error_file = os.path.join(out, f"{point}-0.error")
    return {"point": point, "survivor_exit": None if status0 is None else os.waitstatus_to_exitcode(status0),
            "seconds_after_kill": None if killed is None else round(ended - killed, 2),
            "error": open(error_file).read().split("\n\n")[0] if os.path.exists(error_file) else None}


def main(model_dir: str, out: str, *points: str) -> None:
    import fault_harness
    import lm_eval.evaluator  # noqa: F401 (imported once, before the forks)
    import torch

    fault_harness.warm_imports()
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    for point in points:
        result = run_point(model_dir, out, point)
        with open(os.path.join(out, f"{point}.json"), "w") as file:
            json.dump(result, file)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

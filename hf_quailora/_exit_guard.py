"""At interpreter exit, give torch's collective worker threads a moment with the GIL before Python finalizes.

The race this closes (torch 2.13, CPython 3.11, gloo): a gloo worker thread drops its last reference to a finished
collective's tensors (`ProcessGroupGloo::runLoop` destroying the work) *after* the Python caller has returned from
`wait()`. When the caller's own references are gone, that drop frees a tensor's Python object, which needs the GIL.
If the script ends right after its last collective (trl's logging gathers at the end of `train()`, for one), the main
thread may already be finalizing the interpreter; the worker's `take_gil` then exits the thread by forced unwinding,
which crosses a `noexcept` C++ frame: `terminate called without an active exception`, SIGABRT, and `torchrun` kills
the other processes, a sweep or an export still running on process 0 included. A core dump of a failed run of
`tests/scripts/quailora_ddp.py` shows exactly that stack (`AsyncAllgatherWork::~AsyncAllgatherWork` ->
`THPVariable_clear` -> `take_gil` -> `pthread_exit`).

Destroying the process group does not close it: a DDP reducer holds the group, so its worker threads are not
joined. Releasing the GIL for a moment at exit does: `atexit` handlers run before finalization starts, and the
waiting worker takes the GIL and finishes. docs/launchers.md ("Leaving a gloo run") gives the measurement (an
`all_gather` as a script's last statement: 23 of 70 two-process launches aborted without a handler, none with it);
`tests/test_exit_guard.py` runs eight-process launches with it.
"""

from __future__ import annotations

import atexit
import time


GRACE_SECONDS = 0.1  # 50 ms was enough with two cores oversubscribed 3x; a distributed process ends 0.1 s later


def _release_gil_before_finalizing() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        time.sleep(GRACE_SECONDS)  # the GIL is released while sleeping: a worker waiting on it finishes


_registered = False


def register() -> None:
    """Register the exit handler once per interpreter (importing `hf_quailora` calls this)."""
    global _registered
    if not _registered:
        atexit.register(_release_gil_before_finalizing)
        _registered = True

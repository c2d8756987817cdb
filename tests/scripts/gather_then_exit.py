"""Two or more gloo processes whose last statement is a collective, then interpreter exit (torchrun).

    torchrun --nproc_per_node 8 tests/scripts/gather_then_exit.py [--guard]

With `--guard`, hf_quailora's exit guard is registered first (loaded from its file, without the package's heavy
imports). Without it, about a fifth of processes abort at exit on torch 2.13 / CPython 3.11 (`hf_quailora/_exit_guard.py`).
"""

import importlib.util
import os
import sys

import torch
import torch.distributed as dist


if "--guard" in sys.argv:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "hf_quailora", "_exit_guard.py")
    spec = importlib.util.spec_from_file_location("_exit_guard", path)
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    guard.register()
dist.init_process_group("gloo")
for _ in range(3):  # the outputs are dropped at once: the worker thread holds their last reference
    dist.all_gather([torch.zeros(1000) for _ in range(dist.get_world_size())], torch.ones(1000))

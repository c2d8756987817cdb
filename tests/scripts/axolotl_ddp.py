"""`axolotl train` in each process of a torchrun launch on the CPU (gloo), for tests/integrations/test_axolotl.py.

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/scripts/axolotl_ddp.py CONFIG.yml

Each process runs axolotl's own CLI entry, `axolotl.cli.train.do_cli` (config validation, dataset loading,
`axolotl.train.train`): what `axolotl train CONFIG.yml --launcher torchrun` starts in each process. A CPU needs three
changes, none of them in hf_quailora (docs/launchers.md, "axolotl with several processes"):

- axolotl's NCCL peer-to-peer probe is skipped here. `load_cfg` calls `prepare_optim_env`, whose
  `check_cuda_p2p_ib_support` calls `torch.cuda.can_device_access_peer` whenever `WORLD_SIZE` > 1; without an NVIDIA
  driver that raises "Found no NVIDIA driver on your system" (axolotl catches only an AssertionError there), so
  `axolotl train` with several processes fails on a CPU before it reads the data. The probe only decides whether to
  set `NCCL_P2P_DISABLE`, which gloo does not read.
- `ACCELERATE_USE_CPU=true` in the environment (what `accelerate launch --cpu` sets). Without it transformers' Trainer
  on a CPU runs each process alone ("torch.distributed process group is initialized, but parallel_mode !=
  ParallelMode.DISTRIBUTED"): axolotl has no `use_cpu` option, and `AxolotlTrainer` resets accelerate's state before
  creating its Accelerator, which then reads the variable.
- `max_memory: {cpu: ...}` in the config. With several processes axolotl's `normalize_config` sets `device_map:
  {"": LOCAL_RANK}`, a CUDA device index; with `max_memory` its model loader infers the device map instead (all on
  the CPU).
"""

import sys

import torch


def main(config: str) -> None:
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        import axolotl.utils.trainer

        axolotl.utils.trainer.check_cuda_p2p_ib_support = lambda: True
    from axolotl.cli.train import do_cli

    do_cli(config=config)


if __name__ == "__main__":
    main(sys.argv[1])

"""A failure on one process raises on every process (torchrun, gloo, CPU), for tests/test_dist_utils_sharded.py.

    torchrun --nproc_per_node 2 tests/scripts/failures_sharded.py OUT_DIR

Each process writes `process-{rank}.txt` with the exception types it saw, one per line.
"""

import os
import sys

import torch


def _raise_on(rank: int):
    def work():
        if torch.distributed.get_rank() == rank:
            raise ZeroDivisionError("planned failure")
        return [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}]

    return work


def main(out_dir: str) -> None:
    from hf_quailora._dist_utils import run_on_main_process
    from hf_quailora.quailora.calibration import equalize_batch_counts

    torch.distributed.init_process_group("gloo")
    seen = []
    for call in (lambda: run_on_main_process(_raise_on(0), what="the write"),  # process 0's work fails
                 lambda: equalize_batch_counts(_raise_on(1))):  # process 1's batches fail
        try:
            call()
            seen.append("none")
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            seen.append(type(exc).__name__)
    rank = torch.distributed.get_rank()
    with open(os.path.join(out_dir, f"process-{rank}.txt"), "w") as file:
        file.write("\n".join(seen))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""One layer's solve workspace on the CPU: the in-place Cholesky and the chunked report (issue 34) against the former
out-of-place Cholesky and whole `E·H`, peak RSS in a fresh process per case, beside the formula
(`hf_quailora.quailora.memory`).

Each case builds `E` (out×in, float64) and a float32 Gram matrix `H` (in×in, as the init accumulates it), then resets
the process's high-water mark (`echo 5 > /proc/self/clear_refs`, after `malloc_trim`) and runs what `_solve_layer`
runs after forming E: the closed-form solve (damped copy of H, Cholesky, top-r SVD of `E·L`, the factors) and the
report's errors (H cast to float64, then `tr[(E − BA) H (E − BA)ᵀ]` for B = 0 and the result). "before" replays the
former code in the same process: a row-major damped copy factorised out of place (`torch.linalg.cholesky_ex` then
holds a second in×in matrix) and `E·H` formed whole. The peak counted is `VmHWM − VmRSS` before the solve, plus E's
bytes (the formula counts E, which the caller holds); the formula's phases are those after E is formed. Every case
runs with `MALLOC_MMAP_THRESHOLD_=131072`, so that each freed tensor is returned to the OS at once.

Usage (the run recorded in bench/RESULTS.md):

    python bench/bench_solve_memory.py --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import status_bytes  # noqa: E402 (run as a script: bench/ on sys.path)


MMAP_THRESHOLD = 128 * 1024


def _former_code(solvers) -> None:
    """Replace the in-place Cholesky by the former out-of-place one on a row-major damped copy."""
    import torch

    def damp(H, damping, dtype=None):
        damped = H.to(dtype or H.dtype, copy=True)
        damped.diagonal().add_(max(damping, torch.finfo(damped.dtype).eps) * torch.diagonal(damped).mean())
        return damped

    def cholesky(H):
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() != 0:
            raise ValueError("not positive definite")
        return L

    solvers.damp, solvers._cholesky = damp, cholesky


def run_case(out: int, inp: int, variant: str, rank: int, threads: int) -> dict:
    """One solve and its report in this (fresh) process; peak extra RSS and seconds."""
    import torch

    from hf_quailora.quailora import solvers

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    E = torch.randn(out, inp, dtype=torch.float64, generator=generator) * 1e-2
    X = torch.randn(2 * inp, inp, generator=generator)
    H = X.T @ X  # float32, as the init accumulates it
    del X
    solvers.solve_closed_form(E[:8, :16].clone(), H[:16, :16].clone(), 2)  # load the LAPACK code first
    if variant == "before":
        _former_code(solvers)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status_bytes("VmRSS")
    started = time.perf_counter()
    B, A, _ = solvers.solve_closed_form(E, H, rank)
    H64 = H.to(torch.float64)  # the report's H, in the solve dtype (quailora/init.py)
    if variant == "before":
        EH = E @ H64
        errors = [solvers.calibrated_error(E, H64, None, None, EH=EH), solvers.calibrated_error(E, H64, B, A, EH=EH)]
        del EH
    else:
        errors = solvers.calibrated_errors(E, H64, [None, (B, A)])
    seconds = time.perf_counter() - started
    return {"peak_extra": status_bytes("VmHWM") - before + E.nbytes, "seconds": seconds,
            "relative_error": float(errors[1] / errors[0])}


def formula(out: int, inp: int, variant: str) -> int:
    """The formula's workspace after E is formed (bytes, float64): the Cholesky, the SVD and the report phases."""
    small = min(out, inp)
    svd = 2 * out * inp + inp * inp + 3 * small * small
    if variant == "before":
        return 8 * max(out * inp + 2 * inp * inp, svd, 2 * out * inp + inp * inp)
    from hf_quailora.quailora.memory import REPORT_CHUNK_ROWS

    return 8 * max(out * inp + inp * inp, svd, out * inp + inp * inp + min(out, REPORT_CHUNK_ROWS) * inp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1024x4096,2048x8192", help="out x in of the layers to solve")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        out, inp, variant = int(args.case[0]), int(args.case[1]), args.case[2]
        print(json.dumps(run_case(out, inp, variant, args.rank, args.threads)))
        return
    mib = 2**20
    print(f"One layer's closed-form solve and report, float64, r={args.rank}, torch threads {args.threads}; peak RSS "
          "(+ E) in a fresh process per case.\n")
    print("| out × in | code | peak (measured) | formula | measured / formula | seconds | objective / QLoRA's |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        out, inp = (int(part) for part in shape.split("x"))
        for variant in ("before", "after"):
            command = [sys.executable, os.path.abspath(__file__), "--rank", str(args.rank), "--threads",
                       str(args.threads), "--case", str(out), str(inp), variant]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            expected = formula(out, inp, variant)
            print(f"| {out} × {inp} | {variant} | {row['peak_extra'] / mib:,.0f} MiB | {expected / mib:,.0f} MiB | "
                  f"{row['peak_extra'] / expected:.2f} | {row['seconds']:.1f} | {row['relative_error']:.6f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""Solvers for the calibrated low-rank correction of a quantization error (pure tensor math, torch only).

References:
    - QuAILoRA: Lawton et al., "QuAILoRA: Quantization-Aware Initialization for LoRA", 2024 (ALS on the
      calibrated objective, started from the truncated SVD of E).
    - CLoQ, 2025: the exact closed form of the same one-sided weighted low-rank approximation.

Notation (methods.md): `E = W − Q ∈ R^{out×in}`, `H = XᵀX ∈ R^{in×in}`; the solvers return factors of the
*product* `M = sBA ≈ E` as `(B̃, Ã)` with `M = B̃ Ã`; dividing each by `√s` gives LoRA's `lora_B` / `lora_A`
(`split_for_lora`). Every objective is

    L(M) = tr[(E − M) H (E − M)ᵀ] = ‖(E − M) L‖²_F,   H = L Lᵀ.

Components come out sorted by their calibrated error reduction, so the first `b` components of the closed-form
solution are exactly the optimal rank-`b` solution.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LowRankFactors(NamedTuple):
    """A rank-k product `M = B @ A` split into components sorted by the error each one removes.

    Attributes:
        B (`torch.Tensor`): out×k.
        A (`torch.Tensor`): k×in.
        gains (`torch.Tensor`): k, descending: component i reduces the objective by `gains[i]`.
    """

    B: torch.Tensor
    A: torch.Tensor
    gains: torch.Tensor


_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check(E: torch.Tensor, H: torch.Tensor | None, r: int) -> None:
    if E.dim() != 2:
        raise ValueError(f"E must be a matrix (out×in); got shape {tuple(E.shape)}.")
    if E.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"Solve in float32 or float64; E has dtype {E.dtype}. Upcast it first.")
    if H is not None and H.shape != (E.shape[1], E.shape[1]):
        raise ValueError(f"H must be {E.shape[1]}×{E.shape[1]} to match E {tuple(E.shape)}; got {tuple(H.shape)}.")
    if not isinstance(r, int) or r < 1 or r > min(E.shape):
        raise ValueError(f"The rank r ({r}) must be an integer between 1 and min(out, in) = {min(E.shape)}.")


def damp(H: torch.Tensor, damping: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return `H + λI` with `λ = damping · mean(diag H)`: one new matrix, in `dtype` (default: H's).

    Casting here (a float32 Gram matrix into a float64 solve) makes the damped copy the only one: no separate cast
    of H is held beside it. The copy is column-major (the same values), the layout `torch.linalg.cholesky_ex`
    returns its factor in, so `_cholesky` factorises it in place.
    """
    if damping < 0:
        raise ValueError(f"`damping` ({damping}) must be >= 0.")
    # One copy of H (not the two of `H + λ·eye`), column-major: the layout LAPACK / cuSOLVER factorise in, so that
    # `_cholesky` can write the factor over it (a row-major `out=` would get a hidden column-major copy).
    damped = torch.empty_strided(H.shape, (1, H.shape[0]), dtype=dtype or H.dtype, device=H.device).copy_(H)
    scale = torch.diagonal(damped).mean()
    # Even with damping=0 add a rounding-level ridge, so an exactly singular H still factorises.
    lam = max(damping, torch.finfo(damped.dtype).eps) * scale
    if not torch.isfinite(lam) or lam <= 0:
        lam = torch.tensor(torch.finfo(damped.dtype).eps, dtype=damped.dtype, device=damped.device)
    damped.diagonal().add_(lam)
    return damped


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of `H`, written over `H` (callers pass the fresh damped copy of `damp`): the factorisation
    holds one in×in matrix in the solve dtype, not two (docs/memory.md; the factor is bit-identical to the
    out-of-place one on the CPU, `tests/quailora/test_solvers.py`)."""
    info = torch.empty((), dtype=torch.int32, device=H.device)
    L, info = torch.linalg.cholesky_ex(H, out=(H, info))
    if info.item() != 0:
        raise ValueError(
            "The (damped) Gram matrix is not positive definite; raise `damping` (e.g. to 1e-2) or use more "
            "calibration tokens."
        )
    return L


def calibrated_error(
    E: torch.Tensor,
    H: torch.Tensor,
    B: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    EH: torch.Tensor | None = None,
):
    """`tr[(E − BA) H (E − BA)ᵀ]` without forming `BA` (B: out×k, A: k×in); `B=None` means `M = 0`.

    Pass `EH = E @ H` when evaluating several candidates: it is the only O(out·in²) term.
    """
    EH = E @ H if EH is None else EH
    total = torch.sum(EH * E)
    if B is None:
        return total
    AH = A @ H  # k×in
    cross = torch.sum(B * (EH @ A.T))  # tr(B A H Eᵀ), H symmetric
    quad = torch.sum((B.T @ B) * (AH @ A.T))  # tr(Bᵀ B A H Aᵀ)
    return total - 2 * cross + quad


REPORT_CHUNK_ROWS = 1024


def calibrated_errors(E: torch.Tensor, H: torch.Tensor, candidates, chunk_rows: int = REPORT_CHUNK_ROWS) -> list:
    """`calibrated_error(E, H, B, A)` for each `(B, A)` of `candidates` (`None`: `M = 0`), forming `E·H` by
    `chunk_rows` rows of E at a time: beside E and H only `chunk_rows × in` of the product is alive, not `out × in`.

    Equal to `calibrated_error` up to the order of the float sums.

    Example:

    ```python
    qlora, result = calibrated_errors(E, H, [None, (B, A)])
    ```
    """
    candidates = list(candidates)
    total = torch.zeros((), dtype=E.dtype, device=E.device)
    # tr(B A H Eᵀ) needs (E H) Aᵀ (out×k): gathered chunk by chunk
    EHA = [None if pair is None else torch.empty(E.shape[0], pair[1].shape[0], dtype=E.dtype, device=E.device)
           for pair in candidates]
    for start in range(0, E.shape[0], chunk_rows):
        rows = E[start:start + chunk_rows]
        EH = rows @ H
        total += torch.dot(EH.reshape(-1), rows.reshape(-1))  # tr(E H Eᵀ) over these rows, no product kept
        for pair, product in zip(candidates, EHA):
            if pair is not None:
                product[start:start + rows.shape[0]] = EH @ pair[1].T
        del EH
    errors = []
    for pair, product in zip(candidates, EHA):
        if pair is None:
            errors.append(total)
            continue
        B, A = pair
        quad = torch.sum((B.T @ B) * ((A @ H) @ A.T))  # tr(Bᵀ B A H Aᵀ)
        errors.append(total - 2 * torch.sum(B * product) + quad)
    return errors


def frobenius_error(E: torch.Tensor, B: torch.Tensor | None = None, A: torch.Tensor | None = None):
    """`‖E − BA‖²_F` without forming `BA`; `B=None` means `M = 0`."""
    total = torch.sum(E * E)
    if B is None:
        return total
    return total - 2 * torch.sum(B * (E @ A.T)) + torch.sum((B.T @ B) * (A @ A.T))


def _top_singular(Y: torch.Tensor, r: int):
    """Top-`r` singular triplets `(U, S, V)` of `Y`, from `eigh` of its smaller Gram matrix.

    Several times faster than a full SVD on CPUs; exact up to rounding for every singular value above
    `σ_max · √eps`, which covers any component worth keeping in float64.
    """
    tiny = torch.finfo(Y.dtype).tiny
    if Y.shape[0] <= Y.shape[1]:
        evals, evecs = torch.linalg.eigh(Y @ Y.T)
        U = evecs[:, -r:].flip(-1)
        S = evals[-r:].flip(-1).clamp_min(0).sqrt()
        V = (Y.T @ U) / S.clamp_min(tiny)
    else:
        evals, evecs = torch.linalg.eigh(Y.T @ Y)
        V = evecs[:, -r:].flip(-1)
        S = evals[-r:].flip(-1).clamp_min(0).sqrt()
        U = (Y @ V) / S.clamp_min(tiny)
    # Below σ_max·√eps the triplets are rounding noise (and dividing by them overflows): they become exact zeros,
    # i.e. components that reduce nothing (callers give such components peft's default start).
    negligible = S <= S.max() * math.sqrt(torch.finfo(Y.dtype).eps)
    if negligible.any():
        S = S.masked_fill(negligible, 0)
        U = U.masked_fill(negligible, 0)
        V = V.masked_fill(negligible, 0)
    return U, S, V


def _balanced_factors(U: torch.Tensor, S: torch.Tensor, W: torch.Tensor):
    """Components `u_i s_i w_iᵀ` (U: out×k, S: k, W: in×k) as factors with equal column/row norms.

    Why balanced (issue 36 asked to keep it and say why):
    - Of all splits `b_i = c_i √(σ_i) u_i`, `a_i = √(σ_i) w_i / c_i` of the same product, the first Adam steps move
      the product by `‖ΔW‖² ∝ d_out ‖A‖² + d_in ‖B‖²` (quailora/step_ratio.py). The smallest such step comes at
      `c⁴ = d_out / d_in`: balanced (c = 1) for a square layer, and within `(d_out + d_in) / (2 √(d_out d_in))` of
      it otherwise (1.12 for SmolLM2-135M's MLP, 1.15 for its k/v projections), a gain not worth a per-layer split.
    - Truncating to the first b components (dynamic rank) drops whole components; equal norms keep every kept
      component's two factors on the same scale, whatever b.
    - Issue 36 reports that the split changed nothing measurable after fine-tuning: A re-split to peft's default
      row norms, B absorbing the magnitude, gave a held-out perplexity of 28.468 against 28.448 (SmolLM2-135M,
      r = 64, 40 steps; its author's run, not repeated here).
    """
    w_norm = W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
    B = U * torch.sqrt(S * w_norm)
    A = (W * torch.sqrt(S / w_norm)).T
    return B, A


@torch.no_grad()
def solve_closed_form(E: torch.Tensor, H: torch.Tensor, r: int, damping: float = 1e-4) -> LowRankFactors:
    """Exact minimiser of `tr[(E − M) H (E − M)ᵀ]` over rank-`r` `M` (CLoQ's closed form).

    With `H = L Lᵀ` (Cholesky of the damped H): `M = LR_r(E L) L⁻¹`.

    Args:
        E (`torch.Tensor`): quantization error, out×in, float32 or float64.
        H (`torch.Tensor`): Gram matrix of the layer's inputs, in×in (any float dtype: its damped copy is made in
            E's dtype, so a float32 H costs no extra float64 copy).
        r (`int`): rank, `1 ≤ r ≤ min(out, in)`.
        damping (`float`, defaults to 1e-4): `H ← H + damping · mean(diag H) · I`.

    Returns:
        `LowRankFactors(B, A, gains)`: `B` out×r and `A` r×in with `M = B @ A`, sorted so that component `i` reduces the
        calibrated error by `gains[i]` (descending); truncating to the first `b` is the rank-`b` optimum.

    Example:

    ```python
    B, A, gains = solve_closed_form(E, H, r=16)
    ```
    """
    _check(E, H, r)
    L = _cholesky(damp(H, damping, dtype=E.dtype))  # H may be float32: the damped copy is in E's dtype
    U, S, V = _top_singular(E @ L, r)  # methods.md §1: sBA = LR_r(E Rᵀ)(Rᵀ)⁻¹
    W = torch.linalg.solve_triangular(L.T, V, upper=True)  # L⁻ᵀ V: rows of A live in the un-whitened space
    B, A = _balanced_factors(U, S, W)
    return LowRankFactors(B, A, S**2)


def _sort_whitened(B: torch.Tensor, AL: torch.Tensor, L: torch.Tensor) -> LowRankFactors:
    """Sort the product `B (AL) L⁻¹` into components by calibrated gain, given `AL = A L` and the Cholesky factor L."""
    Qb, Rb = torch.linalg.qr(B)  # B A L = Qb (Rb A L), and Rb A L is only k×in
    U, S, Vh = torch.linalg.svd(Rb @ AL, full_matrices=False)
    W = torch.linalg.solve_triangular(L.T, Vh.T, upper=True)
    B_sorted, A_sorted = _balanced_factors(Qb @ U, S, W)
    return LowRankFactors(B_sorted, A_sorted, S**2)


@torch.no_grad()
def sort_components(B: torch.Tensor, A: torch.Tensor, H: torch.Tensor, damping: float = 1e-4) -> LowRankFactors:
    """Re-split a rank-`k` product `B @ A` into components sorted by calibrated error reduction.

    The product is unchanged; only its split into components changes (SVD of `B A L`, `H = L Lᵀ`).

    Returns:
        `(B, A, gains)` as in `solve_closed_form`.
    """
    L = _cholesky(damp(H, damping))
    return _sort_whitened(B, A @ L, L)


@torch.no_grad()
def solve_svd(E: torch.Tensor, r: int) -> LowRankFactors:
    """Uncalibrated start: truncated SVD of `E` (LoftQ-style with Q fixed), balanced factors.

    Returns:
        `(B, A, gains)` with `M = B @ A` and `gains` the squared singular values (Frobenius error reduction).
    """
    _check(E, None, r)
    U, S, V = _top_singular(E, r)
    root = torch.sqrt(S)
    return LowRankFactors(U * root, root[:, None] * V.T, S**2)


def _ridge_solve(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Solve `G X = R` for symmetric PSD `G`, with a tiny ridge so rank-deficient factors stay finite."""
    eps = torch.finfo(G.dtype).eps * max(1.0, float(torch.diagonal(G).abs().max())) * G.shape[0]
    return torch.linalg.solve(G + eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), R)


@torch.no_grad()
def solve_als(
    E: torch.Tensor,
    H: torch.Tensor,
    r: int,
    iterations: int = 20,
    damping: float = 1e-4,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LowRankFactors:
    """QuAILoRA's alternating least squares on the calibrated objective, from the truncated SVD of E.

    B-step (A fixed): `B = (E H Aᵀ)(A H Aᵀ)⁻¹`;  A-step (B fixed): `A = (BᵀB)⁻¹ Bᵀ E` (H cancels).
    The same iterates are computed in whitened coordinates (`H = L Lᵀ`, `Ẽ = E L`, `Ã = A L`), mostly on the Gram
    matrix of `Ẽ`'s smaller side: after a one-off O(out·in·min(out, in)), each iteration costs
    O(min(out, in)²·r + r³).

    Args:
        E, H, r, damping: as in `solve_closed_form`.
        iterations (`int`, defaults to 20): number of (B-step, A-step) pairs.
        start (`(B, A)`, *optional*): the starting factors (`M = B @ A`, rank `r`); defaults to `solve_svd(E, r)`.
            Pass the SVD start when it is already computed.

    Returns:
        `(B, A, gains)`, sorted as in `sort_components`.

    Example:

    ```python
    B, A, gains = solve_als(E, H, r=16, iterations=20)
    ```
    """
    _check(E, H, r)
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"`iterations` ({iterations}) must be a non-negative integer.")
    if start is None:
        B, A, _ = solve_svd(E, r)
    else:
        B, A = start
        if B.shape != (E.shape[0], r) or A.shape != (r, E.shape[1]):
            raise ValueError(
                f"`start` must be (B, A) of shapes {(E.shape[0], r)} and {(r, E.shape[1])}; "
                f"got {tuple(B.shape)} and {tuple(A.shape)}."
            )
        B, A = B.to(E.dtype), A.to(E.dtype)
    L = _cholesky(damp(H, damping))
    EL = E @ L
    AL = A @ L
    if iterations == 0:
        return _sort_whitened(B, AL, L)
    # Same iterates as alternating the two steps `iterations` times, but each pair in the middle touches only the Gram
    # matrix of Ẽ's smaller side, O(min(out, in)²·r): eliminating Ã, a (A-step, B-step) pair maps B to
    # G B (Bᵀ G B)⁻¹ (Bᵀ B) with G = Ẽ Ẽᵀ; eliminating B, a (B-step, A-step) pair maps Z = Ãᵀ to
    # K Z (Zᵀ K Z)⁻¹ (Zᵀ Z) with K = Ẽᵀ Ẽ.
    if EL.shape[0] <= EL.shape[1]:
        B = _ridge_solve(AL @ AL.T, AL @ EL.T).T  # B-step 1
        G = EL @ EL.T
        for _ in range(iterations - 1):  # A-step k, B-step k+1
            GB = G @ B
            B = GB @ _ridge_solve(B.T @ GB, B.T @ B)
    else:
        K = EL.T @ EL
        Z = AL.T
        for _ in range(iterations - 1):  # B-step k, A-step k
            KZ = K @ Z
            Z = KZ @ _ridge_solve(Z.T @ KZ, Z.T @ Z)
        B = _ridge_solve(Z.T @ Z, Z.T @ EL.T).T  # B-step `iterations`
    AL = _ridge_solve(B.T @ B, B.T @ EL)  # A-step `iterations` (methods.md §1, whitened)
    return _sort_whitened(B, AL, L)


@torch.no_grad()
def split_for_lora(B: torch.Tensor, A: torch.Tensor, scaling: float):
    """Turn factors of the product `M = B A` into `(lora_B, lora_A)` with `scaling · lora_B @ lora_A = M`."""
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"The LoRA scaling must be a positive number; got {scaling}.")
    root = math.sqrt(scaling)
    return B / root, A / root

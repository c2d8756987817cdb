"""Numerics of the solvers on random matrices, against independent references."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_quailora.quailora.solvers import (
    _cholesky,
    calibrated_error,
    calibrated_errors,
    damp,
    frobenius_error,
    solve_als,
    solve_closed_form,
    solve_svd,
    sort_components,
    split_for_lora,
)


def make_problem(out=48, inn=32, n=400, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    E = torch.randn(out, inn, generator=generator, dtype=dtype)
    # Correlated, anisotropic activations: the calibrated and uncalibrated optima differ.
    mix = torch.randn(inn, inn, generator=generator, dtype=dtype) * torch.logspace(0, -2, inn, dtype=dtype)
    X = torch.randn(n, inn, generator=generator, dtype=dtype) @ mix
    return E, X, X.T @ X


def reference_optimum(E, H, r):
    """Whitened SVD with the symmetric square root H^{1/2} (not Cholesky) and a full SVD."""
    evals, evecs = torch.linalg.eigh(H)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    U, S, Vh = torch.linalg.svd(E @ root)
    return (U[:, :r] * S[:r]) @ Vh[:r] @ inv_root


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_closed_form_equals_independent_reference(shape):
    E, X, H = make_problem(*shape)
    B, A, _ = solve_closed_form(E, H, 6, damping=0.0)
    M_ref = reference_optimum(E, H, 6)
    torch.testing.assert_close(B @ A, M_ref, rtol=1e-7, atol=1e-9)


def test_calibrated_error_matches_brute_force():
    E, X, H = make_problem()
    B, A, _ = solve_svd(E, 5)
    brute = torch.linalg.matrix_norm(X @ (E - B @ A).T) ** 2
    torch.testing.assert_close(calibrated_error(E, H, B, A), brute)
    torch.testing.assert_close(calibrated_error(E, H), torch.linalg.matrix_norm(X @ E.T) ** 2)
    torch.testing.assert_close(frobenius_error(E, B, A), torch.linalg.matrix_norm(E - B @ A) ** 2)


def test_closed_form_beats_every_other_rank_r_matrix():
    E, X, H = make_problem()
    r = 5
    B, A, _ = solve_closed_form(E, H, r, damping=0.0)
    best = calibrated_error(E, H, B, A)
    generator = torch.Generator().manual_seed(1)
    candidates = [solve_svd(E, r)[:2], solve_als(E, H, r, iterations=2, damping=0.0)[:2]]
    for _ in range(20):  # random perturbations of the optimum and random matrices
        noise = 1e-2 * torch.randn(B.shape, generator=generator, dtype=B.dtype)
        candidates.append((B + noise, A))
        candidates.append((torch.randn(B.shape, generator=generator, dtype=B.dtype), A))
    # Brute-force gradient descent from the SVD start must not beat it either.
    Bg, Ag = (t.clone().requires_grad_(True) for t in solve_svd(E, r)[:2])
    optimizer = torch.optim.Adam([Bg, Ag], lr=1e-2)
    for _ in range(3000):
        optimizer.zero_grad()
        loss = calibrated_error(E, H, Bg, Ag)
        loss.backward()
        optimizer.step()
    candidates.append((Bg.detach(), Ag.detach()))
    for cand_B, cand_A in candidates:
        assert calibrated_error(E, H, cand_B, cand_A) >= best * (1 - 1e-10)
    # and gradient descent gets close to it (the optimum is reachable, not just a bound)
    assert calibrated_error(E, H, Bg.detach(), Ag.detach()) <= best * 1.01


def test_als_converges_to_closed_form():
    E, X, H = make_problem()
    B, A, _ = solve_closed_form(E, H, 6, damping=1e-4)
    optimum = calibrated_error(E, H, B, A)
    errors = [calibrated_error(E, H, *solve_als(E, H, 6, iterations=k, damping=1e-4)[:2]) for k in (0, 1, 5, 100)]
    assert errors[0] > errors[-1]
    assert all(a >= b * (1 - 1e-9) for a, b in zip(errors, errors[1:])), errors  # monotone
    assert errors[-1] <= optimum * (1 + 1e-6)


@pytest.mark.parametrize("iterations", [1, 2, 7])
@pytest.mark.parametrize("out", [48, 20])  # out > in and out < in take different paths
def test_als_iterates_equal_the_textbook_steps(iterations, out):
    # solve_als iterates in whitened coordinates on Gram matrices; the products must equal methods.md's B-step /
    # A-step applied verbatim.
    E, X, H = make_problem(out=out)
    Hd = damp(H, 1e-4)
    B, A, _ = solve_svd(E, 5)
    for _ in range(iterations):
        B = (E @ Hd @ A.T) @ torch.linalg.inv(A @ Hd @ A.T)
        A = torch.linalg.inv(B.T @ B) @ B.T @ E
    B_als, A_als, _ = solve_als(E, H, 5, iterations=iterations, damping=1e-4)
    torch.testing.assert_close(B_als @ A_als, B @ A, rtol=1e-8, atol=1e-10)
    start = solve_svd(E, 5)[:2]
    B_s, A_s, _ = solve_als(E, H, 5, iterations=iterations, damping=1e-4, start=start)
    torch.testing.assert_close(B_s @ A_s, B @ A, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="`start` must be"):
        solve_als(E, H, 4, iterations=1, start=start)


@pytest.mark.parametrize("solver", ["closed_form", "als"])
def test_truncation_is_the_rank_b_optimum(solver):
    E, X, H = make_problem()
    if solver == "closed_form":
        B, A, gains = solve_closed_form(E, H, 8, damping=0.0)
    else:
        B, A, gains = solve_als(E, H, 8, iterations=200, damping=0.0)
    assert torch.all(gains[:-1] >= gains[1:])
    base = calibrated_error(E, H)
    for b in (1, 2, 3, 5, 8):
        B_b, A_b, _ = solve_closed_form(E, H, b, damping=0.0)
        truncated = calibrated_error(E, H, B[:, :b], A[:b])
        torch.testing.assert_close(truncated, calibrated_error(E, H, B_b, A_b), rtol=1e-6, atol=0)
        # the gains are the error reductions of the components
        torch.testing.assert_close(base - truncated, gains[:b].sum(), rtol=1e-6, atol=0)


def test_sort_components_keeps_product_and_balances():
    E, X, H = make_problem()
    generator = torch.Generator().manual_seed(3)
    B = torch.randn(48, 4, generator=generator, dtype=torch.float64)
    A = torch.randn(4, 32, generator=generator, dtype=torch.float64)
    B2, A2, gains = sort_components(B, A, H, damping=0.0)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1))
    assert torch.all(gains[:-1] >= gains[1:])


@pytest.mark.parametrize("scaling", [1.0, 2.0, 16 / 4**0.5, 0.125])
def test_split_for_lora_respects_scaling(scaling):
    E, X, H = make_problem()
    B, A, _ = solve_closed_form(E, H, 4)
    lora_B, lora_A = split_for_lora(B, A, scaling)
    torch.testing.assert_close(scaling * lora_B @ lora_A, B @ A)


def test_float32_solve_matches_float64():
    E, X, H = make_problem()
    B64, A64, _ = solve_closed_form(E, H, 6, damping=1e-4)
    B32, A32, _ = solve_closed_form(E.float(), H.float(), 6, damping=1e-4)
    e64 = calibrated_error(E, H, B64, A64)
    e32 = calibrated_error(E, H, B32.double(), A32.double())
    assert abs(e32 - e64) / e64 < 1e-4


def test_bad_input():
    E, X, H = make_problem()
    with pytest.raises(ValueError, match="rank r"):
        solve_closed_form(E, H, 33)
    with pytest.raises(ValueError, match="rank r"):
        solve_svd(E, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        solve_closed_form(E.half(), H, 4)
    with pytest.raises(ValueError, match="must be 32×32"):
        solve_closed_form(E, H[:10, :10], 4)
    with pytest.raises(ValueError, match="damping"):
        solve_closed_form(E, H, 4, damping=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        solve_als(E, H, 4, iterations=-1)
    with pytest.raises(ValueError, match="scaling"):
        split_for_lora(E, E, 0.0)


@pytest.mark.parametrize("out", [48, 20])
def test_rank_deficient_error_gives_finite_factors_and_zero_gains_beyond_its_rank(out):
    # E of rank 3 solved at rank 16: the extra components must be exact zeros, never NaN/inf from 0/0.
    generator = torch.Generator().manual_seed(1)
    E = torch.randn(out, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 32, generator=generator,
                                                                                    dtype=torch.float64)
    _, X, H = make_problem(out=out)
    base = calibrated_error(E, H)
    for B, A, gains in (solve_closed_form(E, H, 16), solve_als(E, H, 16), solve_svd(E, 16)):
        assert torch.isfinite(B).all() and torch.isfinite(A).all() and torch.isfinite(gains).all()
        assert torch.all(gains[3:] <= gains[0] * 1e-12)
        assert calibrated_error(E, H, B, A) <= base * 1e-10


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that the ops inside allocate, alive at once (`peak`): each output storage
    not seen before and not aliasing an input, freed when torch frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            storage = tensor.untyped_storage() if isinstance(tensor, torch.Tensor) else None
            if storage is None or storage.data_ptr() in self.seen | inputs or storage.nbytes() == 0:
                continue
            self.seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
        return out


def test_cholesky_is_written_over_the_damped_copy_bit_for_bit():
    _, _, H = make_problem(out=8, inn=96)
    damped = damp(H, 1e-4)
    expected, _ = torch.linalg.cholesky_ex(damped.clone())  # the out-of-place factor
    with LiveTensorBytes() as counter:
        L = _cholesky(damped)
    # column-major, as LAPACK factorises: a row-major `out=` would get a hidden column-major copy (a structured
    # kernel's proxy output, invisible to this counter)
    assert damped.stride() == expected.stride() == (1, 96)
    assert L.data_ptr() == damped.data_ptr() and torch.equal(L, expected)
    assert counter.peak <= 16  # only `info`: no second in×in matrix


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_report_errors_by_chunks_equal_the_whole_product_and_hold_one_chunk(shape):
    E, _, H = make_problem(*shape)
    B, A, _ = solve_closed_form(E, H, 4)
    with LiveTensorBytes() as counter:
        chunked = calibrated_errors(E, H, [None, (B, A)], chunk_rows=16)
    torch.testing.assert_close(chunked[0], calibrated_error(E, H), rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked[1], calibrated_error(E, H, B, A), rtol=1e-10, atol=0)
    out, inn = shape
    # one 16-row chunk of E·H, (E·H)·Aᵀ (out×4), A·H (4×in) and scalars; never out×in
    bound = (16 * inn + 2 * out * 4 + 2 * 4 * inn + 4 * 4 + 64) * 8
    assert counter.peak <= bound < out * inn * 8


@pytest.mark.parametrize("shape", [(96, 256), (256, 128)])
def test_solve_workspace_counts_the_closed_forms_tensors(shape):
    from hf_quailora.quailora.memory import _solve_workspace

    E, _, H = make_problem(*shape)
    H = H.float()  # a float32 Gram matrix, as the init passes it
    with LiveTensorBytes() as counter:
        solve_closed_form(E, H, 8)
    measured = counter.peak + E.nbytes  # the formula counts E, which the caller holds
    formula = _solve_workspace(*shape) * 8
    assert 0.8 * formula <= measured <= formula  # the eigen-solver's 3·min² is an upper bound

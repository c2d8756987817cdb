"""Numerics of the solvers on random matrices, against independent references."""

import pytest
import torch

from hf_quailora.quailora.solvers import (
    calibrated_error,
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

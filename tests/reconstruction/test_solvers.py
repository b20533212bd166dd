"""Layer-wise solvers on single random layers with correlated inputs, against exact references."""

import pytest
import torch

from sparsenet.calibration.gram import Gram
from sparsenet.pruning.structures import NM, Block, Unstructured
from sparsenet.reconstruction.solvers import (
    LayerProblem,
    admm,
    lsq_refit,
    select_keep,
    sparsegpt,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_problem(seed=0, rows=48, cols=64, n=2000, bias=False, offset=0.5):
    """Inputs with strong shared factors (as real activations have), a random weight."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g)
    x = factors + 0.3 * torch.randn(n, cols, generator=g) + offset * torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    gram = Gram(cols)
    gram.add(x)
    b = torch.randn(rows, generator=g) if bias else None
    return LayerProblem(w, gram.hessian(), b, gram.mean() if bias else None), x


def direct_error(problem, x, weight, bias=None):
    """Relative output error from the raw rows, independent of the solvers' own formula."""
    x = x.double()
    ref = x @ problem.weight.T
    out = x @ weight.double().T
    if problem.bias is not None:
        ref = ref + problem.bias
        out = out + (problem.bias if bias is None else bias.double())
    return float(((out - ref) ** 2).sum() / (ref**2).sum())


def magnitude_keep(problem, sparsity):
    return select_keep(problem.weight.abs(), sparsity, Unstructured())


def test_output_error_matches_raw_rows():
    problem, x = correlated_problem(bias=True)
    keep = magnitude_keep(problem, 0.5)
    w = problem.weight * keep
    assert problem.output_error(w) == pytest.approx(direct_error(problem, x, w), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_obs_halves_magnitude_error_at_50(seed):
    problem, x = correlated_problem(seed)
    mag = direct_error(problem, x, problem.weight * magnitude_keep(problem, 0.5))
    obs = sparsegpt(problem, sparsity=0.5)
    assert direct_error(problem, x, obs.weight) <= 0.5 * mag


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_admm_no_worse_than_obs(seed, sparsity):
    problem, x = correlated_problem(seed)
    obs = sparsegpt(problem, sparsity=sparsity)
    ad = admm(problem, sparsity=sparsity)
    assert direct_error(problem, x, ad.weight) <= direct_error(problem, x, obs.weight) * 1.0001


@pytest.mark.parametrize("seed", range(8))
def test_lsq_refit_never_increases_error(seed):
    g = torch.Generator().manual_seed(100 + seed)
    problem, x = correlated_problem(seed, bias=seed % 2 == 1, n=int(torch.randint(40, 400, (1,), generator=g)))
    sparsity = float(torch.rand(1, generator=g)) * 0.95
    keep = torch.rand(problem.weight.shape, generator=g) >= sparsity
    start = problem.weight * keep
    refit = lsq_refit(problem, keep)
    assert torch.equal(refit.keep, keep)
    assert bool((refit.weight[~keep] == 0).all())
    assert direct_error(problem, x, refit.weight, refit.bias) <= direct_error(problem, x, start) + 1e-12


def test_lsq_refit_matches_per_row_normal_equations():
    problem, x = correlated_problem(3, rows=6, cols=12, n=300)
    keep = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    refit = lsq_refit(problem, keep, damp=1e-12, iters=500, tol=1e-14)
    h, w = problem.hessian, problem.weight
    for r in range(6):
        s = keep[r]
        expect = torch.linalg.solve(h[s][:, s], (w[r] @ h)[s])
        assert torch.allclose(refit.weight[r, s], expect, atol=1e-8)


def test_bias_correction_absorbs_the_mean_shift():
    problem, x = correlated_problem(4, bias=True, offset=3.0)
    keep = magnitude_keep(problem, 0.7)
    plain = LayerProblem(problem.weight, problem.hessian)  # same layer, no bias to correct
    with_bias = lsq_refit(problem, keep)
    without = lsq_refit(plain, keep)
    # The no-bias refit keeps the original bias; the biased one moves it and does better.
    assert not torch.allclose(with_bias.bias, problem.bias)
    assert direct_error(problem, x, with_bias.weight, with_bias.bias) < direct_error(problem, x, without.weight)


@pytest.mark.parametrize("solver", [sparsegpt, admm])
def test_given_mask_is_kept(solver):
    problem, x = correlated_problem(5)
    keep = magnitude_keep(problem, 0.6)
    sol = solver(problem, keep=keep)
    assert torch.equal(sol.keep, keep)
    assert bool((sol.weight[~keep] == 0).all())
    assert direct_error(problem, x, sol.weight) < direct_error(problem, x, problem.weight * keep)


@pytest.mark.parametrize("solver", [sparsegpt, admm])
def test_nm_and_block_patterns(solver):
    problem, _ = correlated_problem(6, rows=32, cols=64)
    nm = solver(problem, structure=NM(2, 4), sparsity=0.5)
    assert bool((nm.keep.view(-1, 4).sum(1) <= 2).all()) and int(nm.keep.sum()) == 32 * 32
    blk = solver(problem, structure=Block(4, 8), sparsity=0.5)
    tiles = blk.keep.view(8, 4, 8, 8).transpose(1, 2).reshape(64, 32).float().mean(1)
    assert bool(((tiles == 0) | (tiles == 1)).all())
    assert int((tiles == 0).sum()) == 32


@pytest.mark.parametrize("solver", [sparsegpt, admm])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_exact_unstructured_counts(solver, sparsity):
    problem, _ = correlated_problem(7)
    sol = solver(problem, sparsity=sparsity)
    assert int((~sol.keep).sum()) == pytest.approx(sparsity * sol.keep.numel(), abs=sol.keep.shape[1] // 64 + 1)
    assert bool((sol.weight[~sol.keep] == 0).all())


def test_dead_inputs_are_pruned_first_and_stay_finite():
    problem, x = correlated_problem(8)
    x[:, :5] = 0
    gram = Gram(x.shape[1])
    gram.add(x)
    dead = LayerProblem(problem.weight, gram.hessian())
    for solver in (sparsegpt, admm):
        sol = solver(dead, sparsity=0.2)
        assert torch.isfinite(sol.weight).all()
        assert not bool(sol.keep[:, :5].any())


def test_rank_deficient_hessian_is_damped_not_nan():
    # Fewer samples than inputs: XᵀX is singular; damping must keep everything finite.
    problem, _ = correlated_problem(9, n=10)
    for solver in (sparsegpt, admm):
        assert torch.isfinite(solver(problem, sparsity=0.5).weight).all()
    assert torch.isfinite(lsq_refit(problem, magnitude_keep(problem, 0.5)).weight).all()


def test_degenerate_and_malformed_problems_raise():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="all zero"):
        LayerProblem(w, torch.zeros(6, 6))
    with pytest.raises(ValueError, match="hessian is"):
        LayerProblem(w, torch.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        LayerProblem(w, torch.full((6, 6), float("nan")))
    with pytest.raises(ValueError, match="mean input"):
        LayerProblem(w, torch.eye(6), bias=torch.zeros(4))
    problem = LayerProblem(w, torch.eye(6))
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt(problem)
    with pytest.raises(ValueError, match="exactly one"):
        admm(problem, sparsity=0.5, keep=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        lsq_refit(problem, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsegpt(problem, sparsity=1.0)
    with pytest.raises(ValueError, match="rows"):
        Gram(6).hessian()

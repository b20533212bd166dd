"""Layer-wise solvers: choose a mask and new kept weights so the layer's output barely moves.

Each solves, for one layer seen as a matrix ``W`` (rows = outputs, cols = inputs), the masked
least-squares problem on calibration inputs ``X``::

    minimise  ||(W_new - W) X||²   subject to  W_new zero outside the keep-mask,

which depends on ``X`` only through ``H = XᵀX / n`` (a :class:`~sparsenet.calibration.gram.Gram`).
With a bias, ``H`` is augmented by the input mean (a constant-1 input column that is never
pruned), so the bias absorbs the mean shift pruning causes: that is the bias correction.

* :func:`lsq_refit` -- the mask is given; solve for the kept weights (conjugate gradients).
* :func:`sparsegpt` -- OBS column by column with ``(H + λI)⁻¹`` (SparseGPT, Frantar & Alistarh
  2023): the mask is chosen block by block from ``w² / [H⁻¹]ᵢᵢ²`` while the error of each pruned
  column is pushed onto the columns not yet processed.
* :func:`admm` -- alternate an exact least-squares step and a projection on the sparse set,
  raising the sparsity gradually (Boža 2024, "Fast and Effective Weight Update for Pruned
  LLMs"), then a final :func:`lsq_refit` on the mask reached.

Everything runs in float64. Damping is relative to the mean of ``diag(H)``; if ``H + λI`` is
still not positive definite the damping grows tenfold and the factorisation is retried.
Inputs that never fire (``Hᵢᵢ = 0``) carry no information: when a solver chooses the mask they
are pruned first, under a given mask they are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..pruning.ranking import lowest_k
from ..pruning.structures import Structure, Unstructured

DEFAULT_DAMP = 0.01
_MAX_DAMP_RETRIES = 6


@dataclass
class LayerProblem:
    """One layer's reconstruction problem, everything float64 on one device.

    ``weight``: the dense reference weight as a matrix (rows, cols); ``hessian``: mean ``XᵀX``
    (cols, cols); ``mean``: mean input row, needed only with a ``bias`` (rows,).
    """

    weight: Tensor
    hessian: Tensor
    bias: Optional[Tensor] = None
    mean: Optional[Tensor] = None

    def __post_init__(self) -> None:
        rows, cols = self.weight.shape
        if self.hessian.shape != (cols, cols):
            raise ValueError(
                f"hessian is {tuple(self.hessian.shape)}, expected ({cols}, {cols}) for a "
                f"{rows}x{cols} weight"
            )
        if self.bias is not None and self.mean is None:
            raise ValueError("a problem with a bias needs the mean input (for bias correction)")
        for name in ("weight", "hessian", "bias", "mean"):
            t = getattr(self, name)
            if t is not None:
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name} of the layer problem contains NaN or Inf")
                setattr(self, name, t.detach().to(torch.float64))
        if float(torch.diagonal(self.hessian).max()) <= 0.0:
            raise ValueError(
                "the layer's calibration inputs are all zero: there is nothing to reconstruct "
                "from (check the calibration data)"
            )

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def augmented(self) -> tuple[Tensor, Tensor]:
        """``[W | b]`` (a copy, which solvers update in place) and ``[[H, μ], [μᵀ, 1]]`` (the
        problem's own ``H`` when there is no bias: read only): the bias as one more, always-kept
        column."""
        if self.bias is None:
            return self.weight.clone(), self.hessian
        cols = self.hessian.shape[0]
        w = torch.cat([self.weight, self.bias[:, None]], dim=1)
        h = self.hessian.new_empty(cols + 1, cols + 1)
        h[:cols, :cols] = self.hessian
        h[:cols, cols] = self.mean
        h[cols, :cols] = self.mean
        h[cols, cols] = 1.0
        return w, h

    def split(self, w_aug: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        cols = self.hessian.shape[0]
        return w_aug[:, :cols].contiguous(), (w_aug[:, cols].clone() if self.has_bias else None)

    def output_error(self, weight: Tensor, bias: Optional[Tensor] = None) -> float:
        """Relative squared output error ``||ΔW X + Δb||² / ||W X + b||²`` on the calibration rows."""
        w0, h = self.augmented()
        w = weight.to(torch.float64)
        if self.has_bias:
            b = self.bias if bias is None else bias.to(torch.float64)
            w = torch.cat([w, b[:, None]], dim=1)
        d = w - w0
        ref = float(((w0 @ h) * w0).sum())
        return float(((d @ h) * d).sum()) / max(ref, 1e-300)


@dataclass
class Solution:
    weight: Tensor  # (rows, cols) float64, zero outside keep
    bias: Optional[Tensor]
    keep: Tensor  # bool (rows, cols)


def _dead_columns(h: Tensor, n_real: int) -> Tensor:
    return torch.diagonal(h)[:n_real] <= 0.0


def _damped(h: Tensor, damp: float, n_real: int) -> Tensor:
    """``H + λI`` with ``λ = damp * mean(diag H)``; dead inputs get the mean diagonal so the
    matrix stays invertible without coupling them to anything."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = _dead_columns(h, n_real)
    mean_diag = float(diag[:n_real][~dead].mean())
    diag[:n_real][dead] = mean_diag
    diag += damp * mean_diag
    return h


def _cholesky(h: Tensor, damp: float, n_real: int) -> Tensor:
    """Lower Cholesky factor of the damped ``h``; more damping until it factorises."""
    for _ in range(_MAX_DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(_damped(h, damp, n_real))
        if int(info) == 0:
            return factor
        damp = max(damp * 10.0, 1e-6)
    raise ValueError(
        f"the calibration Hessian is not positive definite even with damping {damp:g}; "
        "the calibration data is degenerate (too few distinct samples?)"
    )


def select_keep(scores: Tensor, sparsity: float, structure: Structure) -> Tensor:
    """Bool keep-mask for a (rows, cols) score matrix: the structure's lowest units go.

    N:M structures choose inside each group; others remove ``round(sparsity * units)``.
    """
    keep_fn = getattr(structure, "keep", None)
    if keep_fn is not None:
        return keep_fn(scores)
    units = structure.units(scores)
    k = round(sparsity * units.numel())
    return structure.expand(lowest_k(units, k), tuple(scores.shape))


def _check_sparsity_or_keep(problem: LayerProblem, sparsity, keep) -> None:
    if (sparsity is None) == (keep is None):
        raise ValueError("pass exactly one of sparsity= (the solver chooses) or keep= (a given mask)")
    if keep is not None:
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(problem.weight.shape):
            raise ValueError(
                f"keep must be a bool mask of shape {tuple(problem.weight.shape)}, got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
    elif not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def _finish(problem: LayerProblem, w_aug: Tensor, keep: Tensor) -> Solution:
    if not torch.isfinite(w_aug).all():
        raise ValueError("the solver produced NaN/Inf weights (degenerate calibration data?)")
    weight, bias = problem.split(w_aug)
    weight = torch.where(keep, weight, weight.new_zeros(()))
    return Solution(weight, bias, keep.contiguous())


# --------------------------------------------------------------------------- least squares


def _masked_cg(w0: Tensor, a: Tensor, start: Tensor, keep: Tensor, iters: int, tol: float) -> Tensor:
    """Minimise ``(w - w0) A (w - w0)ᵀ`` row by row over ``w`` supported on ``keep``.

    Conjugate gradients on the kept coordinates, all rows at once (each row is its own problem,
    its own step sizes). ``A`` is symmetric positive definite; every step lowers the objective,
    so the result is never worse than ``start``.
    """
    m = keep.to(a.dtype)
    x = start * m
    r = -((x - w0) @ a) * m
    p = r.clone()
    rs = (r * r).sum(dim=1)
    stop = tol * tol * rs.clamp_min(1e-300)
    for _ in range(iters):
        if bool((rs <= stop).all()):
            break
        ap = (p @ a) * m
        curv = (p * ap).sum(dim=1)
        alpha = torch.where(curv > 0, rs / curv.clamp_min(1e-300), torch.zeros_like(rs))
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_new = (r * r).sum(dim=1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = r + beta[:, None] * p
        rs = rs_new
    return x


def _normalised(h: Tensor, n_real: int) -> tuple[Tensor, Tensor]:
    """``D⁻¹ H D⁻¹`` with ``D = sqrt(diag H)`` (dead inputs: 1): unit diagonal, so conjugate
    gradients and ADMM's penalty see a well-scaled problem."""
    d = torch.diagonal(h).clone()
    d[:n_real][d[:n_real] <= 0] = 1.0
    s = d.sqrt()
    return h / s[:, None] / s[None, :], s


def lsq_refit(
    problem: LayerProblem,
    keep: Tensor,
    *,
    damp: float = 1e-4,
    iters: int = 200,
    tol: float = 1e-8,
) -> Solution:
    """Best kept weights (and bias) for a given mask: least squares on the calibration inputs.

    ``damp`` (relative to the mean of ``diag H``) pulls the kept weights towards their dense
    values, which only guards ill-conditioned directions: the refit never raises the output
    error of the dense weights under the mask.
    """
    _check_sparsity_or_keep(problem, None, keep)
    w0, h = problem.augmented()
    n_real = problem.weight.shape[1]
    keep_aug = _augment_keep(problem, keep)
    hn, s = _normalised(_damped(h, damp, n_real), n_real)
    x = _masked_cg(w0 * s, hn, w0 * s, keep_aug, iters, tol)
    return _finish(problem, x / s, keep)


def _augment_keep(problem: LayerProblem, keep: Tensor) -> Tensor:
    if not problem.has_bias:
        return keep
    return torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)


# --------------------------------------------------------------------------- SparseGPT / OBS


def _column_block(blocksize: int, structure: Structure) -> int:
    """Column block width: a multiple of the structure's group width so groups never straddle."""
    width = getattr(structure, "m", None) or getattr(structure, "c", None) or 1
    return max(width, (blocksize // width) * width)


def sparsegpt(
    problem: LayerProblem,
    *,
    sparsity: Optional[float] = None,
    keep: Optional[Tensor] = None,
    structure: Structure = Unstructured(),
    damp: float = DEFAULT_DAMP,
    blocksize: int = 128,
) -> Solution:
    """OBS pruning and update, column block by column block (SparseGPT).

    With ``sparsity``, each block of ``blocksize`` columns prunes its lowest ``w² / [H⁻¹]ᵢᵢ²``
    units of ``structure`` (N:M groups are chosen as the sweep reaches them, on the updated
    weights); with ``keep`` the given mask is used and only the weights are updated.
    """
    _check_sparsity_or_keep(problem, sparsity, keep)
    w, h = problem.augmented()
    rows, n_real = problem.weight.shape
    cols = w.shape[1]
    if keep is None:
        w[:, :n_real][:, _dead_columns(h, n_real)] = 0.0
    chol = _cholesky(h, damp, n_real)
    # Upper Cholesky factor of H⁻¹: row i holds the OBS update for column i given columns < i
    # are already fixed, so the sweep never re-inverts.
    hinv = torch.cholesky_inverse(chol)
    u = torch.linalg.cholesky(hinv, upper=True)
    chosen = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    nm = getattr(structure, "keep", None) is not None
    group = getattr(structure, "m", 1) if nm else 1
    width = _column_block(blocksize, structure)
    for i1 in range(0, n_real, width):
        i2 = min(i1 + width, n_real)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diagonal(u1)
        if keep is not None:
            keep1 = keep[:, i1:i2]
        elif not nm:
            keep1 = select_keep(w1 * w1 / (d * d)[None, :], sparsity, structure)
        for i in range(i2 - i1):
            if keep is None and nm and i % group == 0:
                g = slice(i, i + group)
                keep1_g = structure.keep(w1[:, g] ** 2 / (d[g] ** 2)[None, :])
                keep1 = keep1_g if i == 0 else torch.cat([keep1, keep1_g], dim=1)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, col.new_zeros(()))
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        chosen[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return _finish(problem, w, chosen[:, :n_real])


# --------------------------------------------------------------------------- ADMM


def admm(
    problem: LayerProblem,
    *,
    sparsity: Optional[float] = None,
    keep: Optional[Tensor] = None,
    structure: Structure = Unstructured(),
    iters: int = 40,
    rho: float = 0.03,
    rho_growth: float = 1.3,
    rho_every: int = 3,
    ramp: float = 0.7,
    damp: float = DEFAULT_DAMP,
    refit_iters: int = 20,
    dtype: torch.dtype = torch.float32,
) -> Solution:
    """ADMM on ``min ||(W' - W) X||²`` s.t. ``W'`` sparse, then an exact refit on the final mask.

    Split into a dense ``V`` (exact least squares with a penalty ``ρ/2 ||V - Z + U||²``) and a
    sparse ``Z`` (projection of ``V + U`` on the structure's sparse set). The sparsity rises
    along a cubic ramp over the first ``ramp`` fraction of the iterations so weights can move
    before the mask settles; ``ρ`` grows by ``rho_growth`` every ``rho_every`` iterations so the
    split converges. All in the diagonal-normalised problem (unit ``diag H``), where ``|V + U|``
    ranks weights like Wanda's ``|w| ||x||``. The iterations run in ``dtype`` (float32 halves
    their cost; they only steer towards a mask) and the final refit, warm-started from the last
    sparse iterate, in float64. With ``keep`` the mask is fixed, so only the refit remains.
    """
    _check_sparsity_or_keep(problem, sparsity, keep)
    if keep is not None:
        return lsq_refit(problem, keep, damp=damp)
    w0, h = problem.augmented()
    n_real = problem.weight.shape[1]
    w0[:, :n_real][:, _dead_columns(h, n_real)] = 0.0
    hn, s = _normalised(_damped(h, damp, n_real), n_real)
    target = w0 * s
    b = (target @ hn).to(dtype)
    eye = torch.eye(hn.shape[0], dtype=hn.dtype, device=hn.device)

    def project(v: Tensor, level: float) -> Tensor:
        return _augment_keep(problem, select_keep(v[:, :n_real].abs(), level, structure))

    z = target.to(dtype)
    u = torch.zeros_like(z)
    mask = project(z, 0.0)
    r = rho
    inverse = None
    ramp_iters = max(1, int(ramp * iters))
    for it in range(iters):
        if inverse is None or (it > 0 and it % rho_every == 0):
            if it > 0:
                r *= rho_growth
            # One explicit inverse per penalty value: each iteration is then a single matmul.
            inverse = torch.cholesky_inverse(torch.linalg.cholesky((hn + r * eye).to(dtype)))
        v = (b + r * (z - u)) @ inverse
        level = sparsity * (1.0 - (1.0 - min(1.0, (it + 1) / ramp_iters)) ** 3)
        mask = project(v + u, level)
        z = (v + u) * mask
        u += v - z
    final_keep = mask[:, :n_real]
    x = _masked_cg(target, hn, z.to(hn.dtype), mask, refit_iters, 1e-10)
    return _finish(problem, x / s, final_keep)

"""The prepared inputs every backend consumes, and the per-weight scores of SPEC §3.

:func:`dsnot_kernels.refine` validates the user's layer, statistics and config, then builds one
:class:`RefineProblem`. Per-column factors (``S``, ``sqrt(Q)``, ``V^p``) are computed here once,
in torch, so that every backend multiplies/divides exactly the same float32 numbers: a backend
never calls ``sqrt`` or ``pow`` itself (their last-bit rounding differs between libraries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: stands in for V = 0 [deviation]


@dataclass
class RefineProblem:
    """One layer's refinement problem, on one device.

    Shapes: ``weight`` ``[out, in]``; per-column vectors ``[in]`` float32.
    """

    weight: torch.Tensor                 # [out, in] fp16/bf16/fp32: the weights DSnoT scores
    sum_metric_row: torch.Tensor         # [in] f32  S: D = W * S
    sqrt_scaler_row: torch.Tensor        # [in] f32  sqrt(Q): Wanda score A = |W| * sqrt(Q)
    var_pow: torch.Tensor                # [in] f32  max(V, tiny)^p (all ones when p == 0): G = D / var_pow
    init_col_scale: Optional[torch.Tensor]  # [in] f32 initial score = |W| * this (wanda: sqrt(Q), magnitude: 1)
    init_score: Optional[torch.Tensor]   # [out, in] f32 initial score when not of the form above (sparsegpt)
    initial_mask: Optional[torch.Tensor]  # [out, in] bool, True = pruned; None = build it from the score
    pruned_per_row: int                  # k (unstructured); in / M * N for N:M
    prune_n: int                         # N of N:M (0 = unstructured)
    prune_m: int                         # M of N:M (0 = unstructured)
    cycles: int                          # T, the cycle budget per row
    threshold: float                     # τ
    sign_check: bool
    improve_check: bool = False
    moment_check: bool = False
    seq_len: float = 1.0                 # L = ntokens / nsamples (moment check only)

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cols(self) -> int:
        return int(self.weight.shape[1])

    @property
    def is_nm(self) -> bool:
        return self.prune_m > 0


class RefineOutput(NamedTuple):
    """What a backend returns: ``pruned_mask`` bool [out, in]; ``swaps`` int32 [out];
    ``error_before`` / ``error_after`` float32 [out]."""

    pruned_mask: torch.Tensor
    swaps: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor


def column_factors(stats_sum: torch.Tensor, stats_sq: torch.Tensor, stats_var: torch.Tensor,
                   pow_of_var: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S, sqrt(Q), V^p)`` as float32 ``[in]`` vectors (V = 0 read as the smallest normal float)."""
    s = stats_sum.to(torch.float32).contiguous()
    # (+ 0.0 turns the sqrt of a -0.0 mean into +0.0: the Triton kernels read the bits of
    # |w| * sqrt(Q) >= +0.0 as its order)
    sqrt_q = (torch.sqrt(stats_sq.to(torch.float32)) + 0.0).contiguous()
    if pow_of_var == 0:
        var_pow = torch.ones_like(s)
    else:
        var_pow = stats_var.to(torch.float32).clamp_min(TINY).contiguous()
        if pow_of_var != 1:   # x^1 is x: the default p = 1 skips a kernel launch
            var_pow = torch.pow(var_pow, float(pow_of_var))
    return s, sqrt_q, var_pow


def scores(problem: RefineProblem, weight: torch.Tensor, cols: slice = slice(None)):
    """Per-weight float32 scores of SPEC §3 for ``weight`` (rows of ``problem.weight``).

    Returns ``(D, G, A)``, each ``[rows, in]`` float32: ``D = W*S``, ``G = D / V^p``,
    ``A = |W| * sqrt(Q)``. ``W`` is upcast to float32 first.
    """
    w32 = weight.to(torch.float32)
    d = w32 * problem.sum_metric_row[cols]
    g = d / problem.var_pow[cols]
    a = w32.abs() * problem.sqrt_scaler_row[cols]
    return d, g, a


def initial_scores(problem: RefineProblem, row_slice: slice = slice(None)) -> torch.Tensor:
    """The init method's float32 score ``[rows, in]`` (low = pruned first) for the given rows."""
    if problem.init_score is not None:
        return problem.init_score[row_slice].to(torch.float32)
    return problem.weight[row_slice].to(torch.float32).abs() * problem.init_col_scale


def moment_delta(e: torch.Tensor, e2: torch.Tensor, d_p, d_g, a_p, a_g, seq_len: float) -> torch.Tensor:
    """``L²`` times the change of the expected squared output error per token of one swap.

    ``ΔF·L² = L·(A_p² − A_g²) − (D_p² − D_g²) + (e2² − e²)``, all in float64 in this order.
    Derivation (README, "DSnoT that helps"): with independent input channels the per-token
    squared error of a row is ``Σ_{j pruned} w_j² Var(x_j) + (e/L)²`` and
    ``Var(x_j) = Q_j/L − (S_j/L)²``.
    """
    a_p, a_g, d_p, d_g = (t.to(torch.float64) for t in (a_p, a_g, d_p, d_g))
    return seq_len * (a_p * a_p - a_g * a_g) - (d_p * d_p - d_g * d_g) + (e2 * e2 - e * e)


def swap_accepted(problem: RefineProblem, e, e2, sign0, d_p, d_g, a_p, a_g) -> torch.Tensor:
    """The acceptance tests of one proposed swap per row (True = accept; a rejection stops the row).

    ``e``/``e2``: row error before/after the swap (float64); ``d_*``/``a_*``: float32 D and A
    of the pruning (``p``) and growing (``g``) column.
    """
    ok = torch.ones_like(e, dtype=torch.bool)
    if problem.sign_check:
        ok &= torch.sign(e2) == sign0
    if problem.improve_check:
        ok &= e2.abs() < e.abs()
    if problem.moment_check:
        ok &= moment_delta(e, e2, d_p, d_g, a_p, a_g, problem.seq_len) < 0
    return ok

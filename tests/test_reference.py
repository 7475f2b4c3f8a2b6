"""Hand-computed DSnoT cycles on single 1x8 rows (SPEC §2-§5), checked against the oracle.

Every case uses numbers that are exact in binary (multiples of 1/16), unit column factors
(``S = 1`` so ``D = W``; ``V^p = 1`` so ``G = D``; ``sqrt(Q) = 1`` so ``A = |W|``) unless a case
says otherwise, so each cycle can be followed on paper; the comments are that paper. The
expected mask, swaps and errors are asserted exactly, for the reference and, as a second
reader of the same rules, for the fast torch backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels.problem import RefineProblem, moment_delta
from dsnot_kernels.reference import initial_mask_from_score, refine_reference
from dsnot_kernels.torch_fast import refine_torch

BACKENDS = {"reference": refine_reference, "torch": refine_torch}


def row_problem(w: Sequence[float], *, pruned: Optional[Sequence[int]] = None, k: int = 4,
                nm: tuple = (0, 0), cycles: int = 50, tau: float = 0.1, sign_check: bool = False,
                improve_check: bool = False, moment_check: bool = False, seq_len: float = 1.0,
                sqrt_q: Optional[Sequence[float]] = None, var_pow: Optional[Sequence[float]] = None
                ) -> RefineProblem:
    """A one-row problem with ``D = W``; ``pruned`` = the initial mask's pruned columns, or
    None for a magnitude initial mask (``k`` lowest ``|W|``, or N:M per ``nm``)."""
    weight = torch.tensor([w], dtype=torch.float32)
    cols = weight.shape[1]
    ones = torch.ones(cols)
    mask = None
    if pruned is not None:
        mask = torch.zeros(1, cols, dtype=torch.bool)
        mask[0, list(pruned)] = True
    n, m = nm
    return RefineProblem(
        weight=weight, sum_metric_row=ones,
        sqrt_scaler_row=ones if sqrt_q is None else torch.tensor(sqrt_q, dtype=torch.float32),
        var_pow=ones if var_pow is None else torch.tensor(var_pow, dtype=torch.float32),
        init_col_scale=ones, init_score=None, initial_mask=mask,
        pruned_per_row=(cols // m * n) if m else k, prune_n=n, prune_m=m, cycles=cycles,
        threshold=tau, sign_check=sign_check, improve_check=improve_check,
        moment_check=moment_check, seq_len=seq_len)


def check(out, pruned_cols, swaps: int, error_before: float, error_after: float) -> None:
    mask, got_swaps, e_before, e_after = out
    expected = torch.zeros_like(mask)
    expected[0, list(pruned_cols)] = True
    got_cols = mask[0].nonzero().flatten().tolist()
    assert torch.equal(mask, expected), f"pruned columns {got_cols}, expected {sorted(pruned_cols)}"
    assert got_swaps.dtype == torch.int32 and int(got_swaps[0]) == swaps
    assert e_before.dtype == torch.float32 and e_after.dtype == torch.float32
    assert float(e_before[0]) == error_before
    assert float(e_after[0]) == error_after


backend_param = pytest.mark.parametrize("backend", list(BACKENDS))

# Case A, the workhorse:  columns   0     1     2        3       4      5       6     7
#   W = D = G                      1.0   0.25 -0.1875   0.4375 -0.75   0.125  -2.0   3.0
#   initial mask: pruned {0,1,2,3}  ->  e0 = 1 + 0.25 - 0.1875 + 0.4375 = 1.5
#   grow+  (pruned, G > 0, G desc):  0 (1.0), 3 (0.4375), 1 (0.25)
#   grow-  (pruned, G < 0, G asc):   2 (-0.1875)
#   prune- (kept, D < 0, A asc):     4 (0.75), 6 (2.0)
#   prune+ (kept, D > 0, A asc):     5 (0.125), 7 (3.0)
CASE_A = [1.0, 0.25, -0.1875, 0.4375, -0.75, 0.125, -2.0, 3.0]


@backend_param
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["e+", "e-"])
def test_both_signs_then_threshold_stop(backend, sign):
    # e0 = +1.5 (or -1.5 with W negated; every queue swaps with its mirror image):
    # cycle 1 (e > 0): grow 0, prune 4: e = 1.5 - 0.75 - 1.0     = -0.25
    # cycle 2 (e < 0): grow 2, prune 5: e = -0.25 + 0.125 + 0.1875 = 0.0625
    # cycle 3: |e| = 0.0625 <= tau = 0.1: stop, although all queues still have members.
    out = BACKENDS[backend](row_problem([sign * v for v in CASE_A], pruned=[0, 1, 2, 3]))
    check(out, [1, 3, 4, 5], swaps=2, error_before=sign * 1.5, error_after=sign * 0.0625)


@backend_param
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["e+", "e-"])
def test_empty_queue_stop(backend, sign):
    # As above with tau = 0.05, so cycle 3 goes on:
    # cycle 3 (e > 0): grow 3, prune 6: e = 0.0625 - 2.0 - 0.4375 = -2.375 (overshoot accepted:
    #                  there is no improvement test by default)
    # cycle 4 (e < 0): grow- is empty (column 2 was its only member): stop.
    out = BACKENDS[backend](row_problem([sign * v for v in CASE_A], pruned=[0, 1, 2, 3], tau=0.05))
    check(out, [1, 4, 5, 6], swaps=3, error_before=sign * 1.5, error_after=sign * -2.375)


@backend_param
def test_cycle_budget_stop(backend):
    # T = 1: only cycle 1 runs (grow 0, prune 4).
    out = BACKENDS[backend](row_problem(CASE_A, pruned=[0, 1, 2, 3], cycles=1))
    check(out, [1, 2, 3, 4], swaps=1, error_before=1.5, error_after=-0.25)


@backend_param
def test_sign_check_rejects_first_swap(backend):
    # Case A, cycle 1 would take e from +1.5 to -0.25: rejected, the row stops untouched.
    out = BACKENDS[backend](row_problem(CASE_A, pruned=[0, 1, 2, 3], sign_check=True))
    check(out, [0, 1, 2, 3], swaps=0, error_before=1.5, error_after=1.5)


# Case S:  columns    0     1     2     3     4      5     6     7
#   W = D = G        0.5   0.25 -0.25  1.0  -0.25   0.75 -1.5   2.0     pruned {0,1,2,3}, e0 = 1.5
#   grow+: 3, 0, 1      grow-: 2      prune-: 4 (A 0.25), 6 (1.5)      prune+: 5 (0.75), 7 (2.0)
CASE_S = [0.5, 0.25, -0.25, 1.0, -0.25, 0.75, -1.5, 2.0]


@backend_param
def test_sign_check_stop_after_an_accepted_swap(backend):
    # cycle 1: grow 3, prune 4: e = 1.5 - 0.25 - 1.0 = 0.25 (same sign: accepted)
    # cycle 2: grow 0, prune 6: e2 = 0.25 - 1.5 - 0.5 = -1.75: sign flips -> rejected, row stops
    out = BACKENDS[backend](row_problem(CASE_S, pruned=[0, 1, 2, 3], sign_check=True))
    check(out, [0, 1, 2, 4], swaps=1, error_before=1.5, error_after=0.25)


@backend_param
def test_without_sign_check_overshoots(backend):
    # cycle 2 accepted: e = -1.75; cycle 3 (e < 0): grow 2, prune 5: e = -1.75 + 0.75 + 0.25 = -0.75
    # cycle 4: grow- empty: stop.
    out = BACKENDS[backend](row_problem(CASE_S, pruned=[0, 1, 2, 3], sign_check=False))
    check(out, [1, 4, 5, 6], swaps=3, error_before=1.5, error_after=-0.75)


@backend_param
def test_improve_check(backend):
    # Case A with tau = 0.05: |e| goes 1.5 -> 0.25 -> 0.0625 (both improve), then cycle 3 would
    # give |-2.375| > 0.0625: rejected, the row stops (without the check: 3 swaps, see above).
    out = BACKENDS[backend](row_problem(CASE_A, pruned=[0, 1, 2, 3], tau=0.05, improve_check=True))
    check(out, [1, 3, 4, 5], swaps=2, error_before=1.5, error_after=0.0625)


# Case M:  columns  0     1     2     3     4     5    6    7
#   W = D = A      0.5   0.25  0.25  0.25 -1.0   2.0  2.5  3.0      pruned {0,1,2,3}, e0 = 1.25
#   cycle 1 proposes grow 0 (D 0.5), prune 4 (D -1.0): e2 = 1.25 - 1.0 - 0.5 = -0.25 (|e| improves)
#   moment_delta = L·(A_p² − A_g²) − (D_p² − D_g²) + (e2² − e²)
#                = L·(1 − 0.25) − (1 − 0.25) + (0.0625 − 1.5625) = 0.75·L − 2.25
CASE_M = [0.5, 0.25, 0.25, 0.25, -1.0, 2.0, 2.5, 3.0]


@pytest.mark.parametrize("seq_len, expected", [(2.0, -0.75), (3.0, 0.0), (4.0, 0.75)])
def test_moment_delta_by_hand(seq_len, expected):
    e, e2 = torch.tensor([1.25], dtype=torch.float64), torch.tensor([-0.25], dtype=torch.float64)
    d_p, d_g = torch.tensor([-1.0]), torch.tensor([0.5])
    got = moment_delta(e, e2, d_p, d_g, d_p.abs(), d_g.abs(), seq_len)
    assert got.dtype == torch.float64 and float(got[0]) == expected


@backend_param
@pytest.mark.parametrize("seq_len, accepted", [(2.0, True), (3.0, False), (4.0, False)],
                         ids=["L2-accept", "L3-zero-rejects", "L4-reject"])
def test_moment_check(backend, seq_len, accepted):
    # The test is strict (delta < 0), so L = 3 (delta exactly 0) rejects. After an accepted
    # cycle 1, e = -0.25 < 0 and grow- is empty: stop.
    problem = row_problem(CASE_M, pruned=[0, 1, 2, 3], moment_check=True, improve_check=True,
                          seq_len=seq_len)
    out = BACKENDS[backend](problem)
    if accepted:
        check(out, [1, 2, 3, 4], swaps=1, error_before=1.25, error_after=-0.25)
    else:
        check(out, [0, 1, 2, 3], swaps=0, error_before=1.25, error_after=1.25)
    # The improvement test alone accepts the swap in every case.
    out = BACKENDS[backend](row_problem(CASE_M, pruned=[0, 1, 2, 3], improve_check=True))
    check(out, [1, 2, 3, 4], swaps=1, error_before=1.25, error_after=-0.25)


# N:M 3:4, magnitude initial mask (3 lowest |W| of each group of 4 pruned):
#   group 0: W = 0.5, 0.25, -0.125, 2.0     -> pruned {0,1,2}, kept 3 (D 2.0)
#   group 1: W = 0.1875, -0.25, 0.0625, -3.0 -> pruned {4,5,6}, kept 7 (D -3.0)
#   e0 = 0.5 + 0.25 - 0.125 + 0.1875 - 0.25 + 0.0625 = 0.625
#   grow+: 0 (0.5), 1 (0.25), 4 (0.1875), 6 (0.0625)     grow-: 5 (-0.25), 2 (-0.125)
CASE_NM = [0.5, 0.25, -0.125, 2.0, 0.1875, -0.25, 0.0625, -3.0]


@backend_param
def test_nm_group_without_partner(backend):
    # cycle 1 (e > 0): grow 0, partner 3:   e = 0.625 + 2.0 - 0.5     = 2.125
    # cycle 2 (e > 0): grow 1: group 0's only kept column is used: no swap, next cycle
    # cycle 3 (e > 0): grow 4, partner 7:   e = 2.125 - 3.0 - 0.1875  = -1.0625
    # cycle 4 (e < 0): grow 5: group 1 has no partner left: no swap
    # cycle 5 (e < 0): grow 2: group 0 has no partner left: no swap
    # cycle 6: grow- is empty: stop.
    out = BACKENDS[backend](row_problem(CASE_NM, nm=(3, 4)))
    check(out, [1, 2, 3, 5, 6, 7], swaps=2, error_before=0.625, error_after=-1.0625)


@backend_param
def test_nm_partnerless_cycle_uses_budget(backend):
    # T = 2: cycle 2 pops grow 1, finds no partner and does nothing; the budget is spent.
    out = BACKENDS[backend](row_problem(CASE_NM, nm=(3, 4), cycles=2))
    check(out, [1, 2, 3, 4, 5, 6], swaps=1, error_before=0.625, error_after=2.125)


# N:M 2:4, magnitude initial mask:
#   group 0: W = 0.25, -0.5, 1.0, -2.0  -> pruned {0,1}; partners by |W|: 2 (1.0), 3 (-2.0)
#   group 1: W = 0.75, 4.0, -0.125, -3.0 -> pruned {4,6}; partners by |W|: 7 (-3.0), 5 (4.0)
#   e0 = 0.25 - 0.5 + 0.75 - 0.125 = 0.375
#   grow+: 4 (0.75), 0 (0.25)     grow-: 1 (-0.5), 6 (-0.125)
CASE_24 = [0.25, -0.5, 1.0, -2.0, 0.75, 4.0, -0.125, -3.0]


@backend_param
def test_nm_partner_order_without_sign_check(backend):
    # cycle 1 (e > 0): grow 4, partner 7: e = 0.375 - 3.0 - 0.75  = -3.375
    # cycle 2 (e < 0): grow 1, partner 2: e = -3.375 + 1.0 + 0.5  = -1.875
    # cycle 3 (e < 0): grow 6, partner 5 (group 1's second): e = -1.875 + 4.0 + 0.125 = 2.25
    # cycle 4 (e > 0): grow 0, partner 3: e = 2.25 - 2.0 - 0.25  = 0.0
    # cycle 5: |e| <= tau: stop.   Every group still prunes exactly 2.
    out = BACKENDS[backend](row_problem(CASE_24, nm=(2, 4), sign_check=False))
    check(out, [2, 3, 5, 7], swaps=4, error_before=0.375, error_after=0.0)


@backend_param
def test_nm_sign_check_default_rejects(backend):
    # With the N:M default (sign check on), cycle 1's e2 = -3.375 flips the sign: rejected.
    out = BACKENDS[backend](row_problem(CASE_24, nm=(2, 4), sign_check=True))
    check(out, [0, 1, 4, 6], swaps=0, error_before=0.375, error_after=0.375)


# Ties, unstructured, magnitude init, k = 2:
#   W = 0.5 0.5 0.5 4.0 -1.0 4.0 -1.0 4.0
#   initial: |W| = 0.5 three times: the lower columns 0 and 1 are pruned, 2 is kept. e0 = 1.0
#   grow+: G = 0.5 at 0 and 1: the higher column first -> 1, 0
#   prune-: A = 1.0 at 4 and 6: the lower column first -> 4, 6
CASE_TIE = [0.5, 0.5, 0.5, 4.0, -1.0, 4.0, -1.0, 4.0]


@backend_param
def test_ties_positive(backend):
    # cycle 1: grow 1, prune 4: e = 1.0 - 1.0 - 0.5 = -0.5;  cycle 2: grow- empty: stop.
    out = BACKENDS[backend](row_problem(CASE_TIE, k=2))
    check(out, [0, 4], swaps=1, error_before=1.0, error_after=-0.5)


@backend_param
def test_ties_negative(backend):
    # W negated: pruned {0, 1}, e0 = -1.0; grow- (G ascending, ties lower first): 0, 1;
    # prune+ (A ascending, ties lower first): 4, 6.
    # cycle 1: grow 0, prune 4: e = -1.0 + 1.0 + 0.5 = 0.5;  cycle 2: grow+ empty: stop.
    out = BACKENDS[backend](row_problem([-v for v in CASE_TIE], k=2))
    check(out, [1, 4], swaps=1, error_before=-1.0, error_after=0.5)


# Ties, 2:4, magnitude init, no sign check, T = 3:
#   group 0: W = -1.0, 0.25, -1.0, 0.125 -> pruned {1, 3}; kept 0 and 2 tie at |W| = 1:
#            partner order 0, 2 (lower column first)
#   group 1: W = 0.5, 0.5, 0.5, 4.0     -> |W| ties: pruned {4, 5} (lower first); partners 6, 7
#   e0 = 0.25 + 0.125 + 0.5 + 0.5 = 1.375;  grow+: G 0.5 at 4 and 5 -> 5, 4, then 1, 3
CASE_TIE_NM = [-1.0, 0.25, -1.0, 0.125, 0.5, 0.5, 0.5, 4.0]


@backend_param
@pytest.mark.parametrize("cycles, pruned, error_after", [
    (1, [1, 3, 4, 6], 1.375),        # grow 5, partner 6: e = 1.375 + 0.5 - 0.5
    (2, [1, 3, 6, 7], 4.875),        # grow 4, partner 7: e = 1.375 + 4.0 - 0.5
    (3, [0, 3, 6, 7], 3.625),        # grow 1, partner 0 (tie with 2): e = 4.875 - 1.0 - 0.25
], ids=["T1", "T2", "T3"])
def test_ties_nm(backend, cycles, pruned, error_after):
    out = BACKENDS[backend](row_problem(CASE_TIE_NM, nm=(2, 4), cycles=cycles))
    check(out, pruned, swaps=cycles, error_before=1.375, error_after=error_after)


def test_initial_mask_ties_lower_column_first():
    score = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0, 0.5, 2.0, 2.0]])
    # unstructured k = 3: 0.5 (col 5), then the three 1.0s in column order: 1, 2 (not 4)
    assert initial_mask_from_score(score, 3)[0].nonzero().flatten().tolist() == [1, 2, 5]
    # 1:4: group 0 (3, 1, 1, 2) prunes 1; group 1 (1, 0.5, 2, 2) prunes 5
    assert initial_mask_from_score(score, 2, 1, 4)[0].nonzero().flatten().tolist() == [1, 5]
    # 3:4: group 1's two 2.0s: the lower (6) is pruned
    assert initial_mask_from_score(score, 6, 3, 4)[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 6]


@backend_param
def test_growth_uses_variance(backend):
    """G = D / V (p = 1) through the public API: the growth order differs from D's order.

    S = Q = 1 so D = W and A = |W|; V = 4 on column 0, 1 elsewhere.
      columns     0     1     2       3       4     5     6    7
      W = D      1.0   0.5   0.1875  0.125  -0.5  -2.0   1.0  3.0     pruned {0,1,2,3}, e0 = 1.8125
      G          0.25  0.5   0.1875  0.125                            grow+: 1, 0, 2, 3
      prune-: 4 (A 0.5), 5 (A 2.0)
    cycle 1: grow 1, prune 4: e = 1.8125 - 0.5 - 0.5 = 0.8125
    cycle 2: grow 0 (G 0.25 beats 2's 0.1875, though D 1.0 is largest anyway), prune 5:
             e = 0.8125 - 2.0 - 1.0 = -2.1875
    cycle 3: grow- empty: stop.
    """
    weight = torch.tensor([[1.0, 0.5, 0.1875, 0.125, -0.5, -2.0, 1.0, 3.0]])
    var = torch.ones(8)
    var[0] = 4.0
    stats = dk.LayerStats(sum_metric_row=torch.ones(8), scaler_row=torch.ones(8), var=var,
                          nsamples=1, ntokens=1)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :4] = True
    res = dk.refine(weight, stats, dk.RefineConfig(init="magnitude"), backend=backend, initial_mask=mask)
    check((res.pruned_mask, res.swaps, res.error_before, res.error_after), [2, 3, 4, 5],
          swaps=2, error_before=1.8125, error_after=-2.1875)
    # One cycle shows the order: with p = 1 column 1 (G 0.5) grows first; with p = 0 (G = D)
    # column 0 (D 1.0) does.
    one = dict(init="magnitude", max_cycle_time=1)
    res = dk.refine(weight, stats, dk.RefineConfig(**one), backend=backend, initial_mask=mask)
    check((res.pruned_mask, res.swaps, res.error_before, res.error_after), [0, 2, 3, 4],
          swaps=1, error_before=1.8125, error_after=0.8125)
    res = dk.refine(weight, stats, dk.RefineConfig(pow_of_var_regrowing=0.0, **one),
                    backend=backend, initial_mask=mask)
    # cycle 1: grow 0, prune 4: e = 1.8125 - 0.5 - 1.0 = 0.3125
    check((res.pruned_mask, res.swaps, res.error_before, res.error_after), [1, 2, 3, 4],
          swaps=1, error_before=1.8125, error_after=0.3125)


@backend_param
def test_public_api_magnitude_row(backend):
    """Case A through refine(): unit statistics, magnitude init with k = floor(8 · 0.5) = 4.

    |W| ascending: 5 (0.125), 2 (0.1875), 1 (0.25), 3 (0.4375) -> pruned {1,2,3,5}
    e0 = 0.25 - 0.1875 + 0.4375 + 0.125 = 0.625
    grow+: 3 (0.4375), 1 (0.25), 5 (0.125)   grow-: 2     prune-: 4 (0.75), 6 (2.0)   prune+: 0 (1.0), 7
    cycle 1: grow 3, prune 4: e = 0.625 - 0.75 - 0.4375 = -0.5625
    cycle 2: grow 2, prune 0: e = -0.5625 + 1.0 + 0.1875 = 0.625
    cycle 3: grow 1, prune 6: e = 0.625 - 2.0 - 0.25 = -1.625
    cycle 4: grow- empty: stop.
    """
    stats = dk.LayerStats(torch.ones(8), torch.ones(8), torch.ones(8), nsamples=1, ntokens=1)
    res = dk.refine(torch.tensor([CASE_A]), stats, dk.RefineConfig(init="magnitude"), backend=backend)
    check((res.pruned_mask, res.swaps, res.error_before, res.error_after), [0, 4, 5, 6],
          swaps=3, error_before=0.625, error_after=-1.625)
    assert res.backend == backend

"""The oracle: DSnoT exactly as SPEC.md states it, in plain torch, readable top to bottom.

It follows the original research code's procedure (stable full sorts once per layer, then one
swap cycle at a time, vectorised over rows, with a host synchronisation per cycle to see
whether any row is still active), so it doubles as the "original-style" baseline in the
benchmarks. Every other backend must return exactly what this returns (DESIGN.md, rules).

Conventions: a mask is True where a weight is *pruned*. Scores are float32; the row error
``e`` is carried in float64 (so that backends summing in different orders still agree to far
below float32 resolution) and returned rounded to float32.
"""
from __future__ import annotations

import torch

from .problem import RefineOutput, RefineProblem, initial_scores, scores, swap_accepted

INF = float("inf")


# --------------------------------------------------------------------------------------------
# SPEC §2: initial masks
# --------------------------------------------------------------------------------------------
def initial_mask_from_score(score: torch.Tensor, pruned_per_row: int, prune_n: int = 0,
                            prune_m: int = 0) -> torch.Tensor:
    """Prune the lowest scores: ``k`` per row, or ``N`` of every ``M`` columns (N:M).

    Ties: the lower column is pruned first (stable ascending sort). ``score`` ``[out, in]``.
    Returns bool ``[out, in]``, True = pruned.
    """
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if prune_m:
        grouped = score.reshape(rows, cols // prune_m, prune_m)
        order = torch.sort(grouped, dim=-1, stable=True).indices[..., :prune_n]
        mask.view(rows, cols // prune_m, prune_m).scatter_(-1, order, True)
    elif pruned_per_row > 0:
        order = torch.sort(score, dim=1, stable=True).indices[:, :pruned_per_row]
        mask.scatter_(1, order, True)
    return mask


# --------------------------------------------------------------------------------------------
# SPEC §4/§5: candidate queues, as sorted column lists with a member count per row
# --------------------------------------------------------------------------------------------
def _queue(key: torch.Tensor, member: torch.Tensor, descending: bool):
    """Columns of ``member`` ordered by ``key`` (ties: lower column first when ascending,
    higher column first when descending, i.e. the original's walk from the end of a stable
    ascending sort). Returns ``(order [out, in] int64, count [out] int64)``."""
    if descending:
        filled = torch.where(member, key, torch.full_like(key, -INF))
        order = torch.sort(filled, dim=1, stable=True).indices.flip(1)
    else:
        filled = torch.where(member, key, torch.full_like(key, INF))
        order = torch.sort(filled, dim=1, stable=True).indices
    return order, member.sum(1)


def _pop(order: torch.Tensor, count: torch.Tensor, ptr: torch.Tensor):
    """Head of each row's queue at ``ptr``: ``(column, had_one)``."""
    had_one = ptr < count
    col = order.gather(1, ptr.clamp(max=order.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return col, had_one


def refine_reference(problem: RefineProblem) -> RefineOutput:
    """Run SPEC §2-§5 on ``problem`` (all rows at once). See the module docstring."""
    weight = problem.weight
    rows, cols = weight.shape
    d, g, a = scores(problem, weight)

    if problem.initial_mask is not None:
        mask = problem.initial_mask.clone()
    else:
        mask = initial_mask_from_score(initial_scores(problem), problem.pruned_per_row,
                                       problem.prune_n, problem.prune_m)
    initially_pruned = mask.clone()

    d64 = d.to(torch.float64)
    e = torch.where(mask, d64, torch.zeros_like(d64)).sum(1)      # SPEC §3, row error
    error_before = e.to(torch.float32)
    swaps = torch.zeros(rows, dtype=torch.int32, device=weight.device)
    if problem.cycles == 0 or rows == 0:
        return RefineOutput(mask, swaps, error_before, error_before.clone())

    # Queues, fixed before the loop (no score depends on the mask).
    grow_pos, n_grow_pos = _queue(g, initially_pruned & (g > 0), descending=True)
    grow_neg, n_grow_neg = _queue(g, initially_pruned & (g < 0), descending=False)
    ptr_grow_pos = torch.zeros(rows, dtype=torch.int64, device=weight.device)
    ptr_grow_neg = torch.zeros_like(ptr_grow_pos)
    if problem.is_nm:
        m, groups = problem.prune_m, cols // problem.prune_m
        # Partner order per group: initially kept columns by initial score ascending (stable).
        init_score = initial_scores(problem).reshape(rows, groups, m)
        kept = ~initially_pruned.reshape(rows, groups, m)
        partner_order = torch.sort(torch.where(kept, init_score, torch.full_like(init_score, INF)),
                                   dim=-1, stable=True).indices
        partners_left = kept.sum(-1)                                     # [rows, groups]
        partners_used = torch.zeros_like(partners_left)
    else:
        prune_neg, n_prune_neg = _queue(a, ~initially_pruned & (d < 0), descending=False)
        prune_pos, n_prune_pos = _queue(a, ~initially_pruned & (d > 0), descending=False)
        ptr_prune_neg = torch.zeros_like(ptr_grow_pos)
        ptr_prune_pos = torch.zeros_like(ptr_grow_pos)

    row_ids = torch.arange(rows, device=weight.device)
    sign0 = torch.sign(e)
    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    for _ in range(problem.cycles):
        active &= e.abs() > problem.threshold
        positive = e > 0
        g_pos, has_pos = _pop(grow_pos, n_grow_pos, ptr_grow_pos)
        g_neg, has_neg = _pop(grow_neg, n_grow_neg, ptr_grow_neg)
        grow_col = torch.where(positive, g_pos, g_neg)
        active &= torch.where(positive, has_pos, has_neg)
        ptr_grow_pos += (active & positive).long()
        ptr_grow_neg += (active & ~positive).long()

        if problem.is_nm:
            group = grow_col // m
            used = partners_used[row_ids, group]
            has_partner = used < partners_left[row_ids, group]
            slot = partner_order[row_ids, group, used.clamp(max=m - 1)]
            prune_col = group * m + slot
            proposing = active & has_partner      # rows without a partner skip this cycle
        else:
            p_neg, has_pn = _pop(prune_neg, n_prune_neg, ptr_prune_neg)
            p_pos, has_pp = _pop(prune_pos, n_prune_pos, ptr_prune_pos)
            prune_col = torch.where(positive, p_neg, p_pos)
            active &= torch.where(positive, has_pn, has_pp)
            ptr_prune_neg += (active & positive).long()
            ptr_prune_pos += (active & ~positive).long()
            proposing = active

        d_p, d_g = d[row_ids, prune_col], d[row_ids, grow_col]
        e2 = (e + d_p.to(torch.float64)) - d_g.to(torch.float64)
        ok = swap_accepted(problem, e, e2, sign0, d_p, d_g, a[row_ids, prune_col], a[row_ids, grow_col])
        active &= ~proposing | ok                 # a rejected swap stops its row
        accept = proposing & active

        mask[row_ids[accept], grow_col[accept]] = False
        mask[row_ids[accept], prune_col[accept]] = True
        e = torch.where(accept, e2, e)
        swaps += accept.int()
        if problem.is_nm:
            partners_used[row_ids[accept], group[accept]] += 1
        if not bool(active.any()):               # one host sync per cycle, like the original
            break
    return RefineOutput(mask, swaps, error_before, e.to(torch.float32))

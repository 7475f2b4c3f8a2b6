"""The fast pure-torch backend: the reference's results without its full sorts.

Why it is fast (SPEC §8): at most ``T`` candidates are ever taken from a queue, so each queue
is a top-``T`` selection (``torch.topk``) instead of a full row sort, and the initial mask is a
linear-time k-th selection (``torch.kthvalue``). Rows are processed in chunks so the extra
memory stays a few bytes per weight. The swap cycles then run on ``[out, T]`` queue tensors
with no host synchronisation on a GPU.

Ties are resolved exactly like the reference's stable sorts by selecting on one int64 key per
weight: the float32 score's order-preserving integer image in the high 32 bits and the column
(or, where the order wants the higher column first, the descending selection) in the low bits.
"""
from __future__ import annotations

import torch

from .problem import RefineOutput, RefineProblem, initial_scores, scores, swap_accepted

INT64_MIN = torch.iinfo(torch.int64).min
INT64_MAX = torch.iinfo(torch.int64).max
# Weights scored at once: bounds the temporaries (~40 B per weight of the chunk). On a GPU a
# big chunk keeps the launch count low; on a CPU a small one keeps the working set in cache.
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 23}


def ordered_key(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int64 key ordering like ``(x, column)``: x's float32 order in the high 32 bits.

    Negative floats have their magnitude bits flipped so that signed integer order equals
    float order. ``x`` float32 ``[..., in]``; ``cols`` int64 ``[in]``.
    """
    bits = x.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return ordered * (1 << 32) + cols


def _column(key: torch.Tensor) -> torch.Tensor:
    return key & 0xFFFFFFFF


def _select(values: torch.Tensor, member: torch.Tensor, count: int, largest: bool, cols: torch.Tensor):
    """The first ``count`` members by value, as ``(columns, valid)`` ``[rows, count]``.

    Order: descending with ties on the higher column first if ``largest``, else ascending
    with ties on the lower column first. A float32 ``topk`` does the work; rows where equal
    values meet among the selected (where topk's order is unspecified) are redone with the
    exact int64 key, so the result equals a stable sort's.
    """
    sentinel = float("-inf") if largest else float("inf")
    filled = torch.where(member, values, sentinel)
    k = min(count + 1, values.shape[1])                      # one extra to see a tie at the boundary
    top_vals, top_cols = torch.topk(filled, k, dim=1, largest=largest, sorted=True)
    valid = top_vals != sentinel
    tied = ((top_vals[:, 1:] == top_vals[:, :-1]) & valid[:, 1:]).any(1)
    top_cols, valid = top_cols[:, :count], valid[:, :count]
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        key = torch.where(member[rows], ordered_key(values[rows], cols),
                          INT64_MIN if largest else INT64_MAX)
        exact = torch.topk(key, count, dim=1, largest=largest, sorted=True).values
        top_cols[rows] = _column(exact)
    return torch.where(valid, top_cols, 0), valid          # column 0 keeps invalid slots in range


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores per row, ties to the lower column (linear time)."""
    kth = torch.kthvalue(score, k, dim=1, keepdim=True).values
    below = score < kth
    at = score == kth
    room = k - below.sum(1, keepdim=True)                     # how many of the tied ones fit
    return below | (at & (torch.cumsum(at, dim=1) <= room))


def _group_rank(score: torch.Tensor, m: int) -> torch.Tensor:
    """Rank (0 = lowest score, ties: lower column) of every column inside its group of ``m``."""
    rows, cols = score.shape
    x = score.view(rows, cols // m, m)
    mine, other = x.unsqueeze(-1), x.unsqueeze(-2)           # [.., j, 1] vs [.., 1, i]
    earlier = torch.ones(m, m, dtype=torch.bool, device=score.device).tril(-1)   # i < j
    ahead = (other < mine) | ((other == mine) & earlier)
    return ahead.sum(-1).to(_rank_dtype(m)).view(rows, cols)


def _rank_dtype(m: int) -> torch.dtype:
    """The smallest integer dtype that holds ranks/counts in ``[0, m]`` (int8 wraps at 128)."""
    return torch.int8 if m <= 127 else torch.int16 if m <= 32767 else torch.int32


def refine_torch(problem: RefineProblem) -> RefineOutput:
    """SPEC §2-§5 with top-``T`` selections; exactly the reference's output."""
    weight = problem.weight
    rows, cols = weight.shape
    device = weight.device
    depth = max(1, min(problem.cycles, cols))                 # queue length that can be popped
    mask = torch.empty(rows, cols, dtype=torch.bool, device=device)
    e = torch.empty(rows, dtype=torch.float64, device=device)
    col_ids = torch.arange(cols, device=device, dtype=torch.int64)
    n_queues = 2 if problem.is_nm else 4
    queue_cols = torch.zeros(rows, n_queues, depth, dtype=torch.int64, device=device)
    queue_valid = torch.zeros(rows, n_queues, depth, dtype=torch.bool, device=device)
    partner_rank = (torch.empty(rows, cols, dtype=_rank_dtype(problem.prune_m), device=device)
                    if problem.is_nm else None)

    # N:M group ranks compare every pair of a group (~m bytes per weight): fewer rows per chunk
    per_weight = max(1, problem.prune_m // 8) if problem.is_nm else 1
    step = max(1, CHUNK_ELEMENTS.get(device.type, 1 << 19) // (max(cols, 1) * per_weight))
    for r0 in range(0, rows, step):
        rs = slice(r0, min(rows, r0 + step))
        d, g, a = scores(problem, weight[rs])
        need_score = problem.initial_mask is None or problem.is_nm
        score = initial_scores(problem, rs) if need_score else None
        # -- initial mask (SPEC §2) --
        if problem.initial_mask is not None:
            pruned = problem.initial_mask[rs]
        elif problem.is_nm:
            pruned = _group_rank(score, problem.prune_m) < problem.prune_n
        elif problem.pruned_per_row > 0:
            pruned = _lowest_k(score, problem.pruned_per_row)
        else:
            pruned = torch.zeros_like(d, dtype=torch.bool)
        mask[rs] = pruned
        e[rs] = torch.where(pruned, d.to(torch.float64), 0.0).sum(1)
        if problem.cycles == 0:
            continue
        # -- candidate queues (SPEC §4/§5), top-T only --
        queue_cols[rs, 0], queue_valid[rs, 0] = _select(g, pruned & (g > 0), depth, True, col_ids)
        queue_cols[rs, 1], queue_valid[rs, 1] = _select(g, pruned & (g < 0), depth, False, col_ids)
        if problem.is_nm:
            partner_rank[rs] = _group_rank(torch.where(pruned, float("inf"), score), problem.prune_m)
        else:
            queue_cols[rs, 2], queue_valid[rs, 2] = _select(a, ~pruned & (d < 0), depth, False, col_ids)
            queue_cols[rs, 3], queue_valid[rs, 3] = _select(a, ~pruned & (d > 0), depth, False, col_ids)

    error_before = e.to(torch.float32)
    swaps = torch.zeros(rows, dtype=torch.int32, device=device)
    if problem.cycles == 0 or rows == 0:
        return RefineOutput(mask, swaps, error_before, error_before.clone())
    e = _run_cycles(problem, mask, e, swaps, queue_cols, queue_valid, partner_rank)
    return RefineOutput(mask, swaps, error_before, e.to(torch.float32))


def _run_cycles(problem: RefineProblem, mask, e, swaps, queue_cols, queue_valid, partner_rank):
    """The swap cycles over all rows at once; updates ``mask`` and ``swaps`` in place."""
    weight = problem.weight
    rows, cols = weight.shape
    device = weight.device
    row_ids = torch.arange(rows, device=device)
    depth = queue_cols.shape[2]
    s, sqrt_q = problem.sum_metric_row, problem.sqrt_scaler_row

    def score_at(col):
        w = weight[row_ids, col].to(torch.float32)
        return w * s[col], w.abs() * sqrt_q[col]

    def pop(queue, ptr):
        slot = ptr.clamp(max=depth - 1).unsqueeze(1)
        return (queue_cols[:, queue].gather(1, slot).squeeze(1),
                queue_valid[:, queue].gather(1, slot).squeeze(1) & (ptr < depth))

    ptr = torch.zeros(rows, 4, dtype=torch.int64, device=device)
    sign0 = torch.sign(e)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    if problem.is_nm:
        m, kept_per_group = problem.prune_m, problem.prune_m - problem.prune_n
        used = torch.zeros(rows, cols // m, dtype=_rank_dtype(m), device=device)
        in_group = torch.arange(m, device=device)

    # every cycle of a live row pops a grow queue: after 2 * depth of them (+1 to see them
    # empty) every row has stopped, whatever max_cycle_time says (a GPU never checks early)
    for cycle in range(min(problem.cycles, 2 * depth + 1)):
        active &= e.abs() > problem.threshold
        positive = e > 0
        g_pos, has_pos = pop(0, ptr[:, 0])
        g_neg, has_neg = pop(1, ptr[:, 1])
        grow_col = torch.where(positive, g_pos, g_neg)
        active &= torch.where(positive, has_pos, has_neg)
        ptr[:, 0] += active & positive
        ptr[:, 1] += active & ~positive
        if problem.is_nm:
            group = grow_col // m
            used_here = used[row_ids, group]
            has_partner = used_here < kept_per_group
            ranks = partner_rank.view(rows, -1, m)[row_ids, group]              # [rows, m]
            slot = (ranks == used_here.unsqueeze(1)).to(torch.int8).argmax(1)
            prune_col = group * m + slot
            proposing = active & has_partner
        else:
            p_neg, has_pn = pop(2, ptr[:, 2])
            p_pos, has_pp = pop(3, ptr[:, 3])
            prune_col = torch.where(positive, p_neg, p_pos)
            active &= torch.where(positive, has_pn, has_pp)
            ptr[:, 2] += active & positive
            ptr[:, 3] += active & ~positive
            proposing = active
        d_p, a_p = score_at(prune_col)
        d_g, a_g = score_at(grow_col)
        e2 = (e + d_p.to(torch.float64)) - d_g.to(torch.float64)
        ok = swap_accepted(problem, e, e2, sign0, d_p, d_g, a_p, a_g)
        active &= ~proposing | ok
        accept = proposing & active
        mask[row_ids[accept], grow_col[accept]] = False
        mask[row_ids[accept], prune_col[accept]] = True
        e = torch.where(accept, e2, e)
        swaps += accept.to(torch.int32)
        if problem.is_nm:
            used[row_ids[accept], group[accept]] += 1
        if device.type == "cpu" and cycle % 8 == 7 and not bool(active.any()):
            break   # free on a CPU; on a GPU we never synchronise inside the loop
    return e

"""Kernel 2 of 2: every swap cycle of SPEC §4 (unstructured) / §5 (N:M), rows as lanes.

One program owns ``BLOCK_R`` rows, one row per lane; all cycles run in one launch with no
host synchronisation (the loop ends when every lane has stopped or after ``T`` cycles). It
writes the row errors before and after as float32 (the float64 ``e`` stays in registers).
Per cycle and row (float32 scores, float64 error):

    active &= |e| > τ;  pos = e > 0
    g = grow+[ptr] if pos else grow-[ptr]             (queues from kernel 1, -1 = empty)
    unstructured: p = prune-[ptr] if pos else prune+[ptr]
    N:M: b = g - g mod M; u = #accepted partners taken from group b so far;
         p = the initially kept column of group b whose init-score key has rank u among the
         group's initially kept columns (none: no swap this cycle)
    e2 = (e + (double)D[p]) - (double)D[g],  D = w * S   (A = |w| * sqrt(Q) for the moment test)
    accept unless sign_check: sign(e2) != sign(e0) | improve_check: |e2| >= |e| |
                  moment_check: L(A_p²-A_g²) - (D_p²-D_g²) + (e2²-e²) >= 0  (float64, no FMA)
    a rejection stops the row; an accepted swap flips mask[g] -> kept, mask[p] -> pruned.

Partners are taken in rank order, so "initially kept and not yet pruned by a swap" is "rank
``u``" with ``u`` counted from the row's swap history (``[BLOCK_R, HPAD]`` registers, HPAD =
next_pow2(T)). N:M masks are updated from that history after the loop, so during the loop the
stored mask is the initial one (which the partner rule needs); unstructured updates are stored
at once.

Memory traffic per row and cycle: 2 queue entries (4 B each), 2 weights and 2-3 column factors
(L1/L2 hits); N:M adds one group of ``M`` weights, init scores and mask bytes. Final writes:
the ``<= 2T`` flipped mask bytes, ``swaps`` and ``e``. Launch with ``enable_fp_fusion=False``
so that ``a*a - b*b`` is not contracted into an FMA (the reference rounds each product).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import ordered_key, sign_f64


@triton.jit
def cycles_kernel(
    w_ptr, s_ptr, sq_ptr, scale_ptr, iscore_ptr, params_ptr,
    mask_ptr, e_ptr, queue_ptr, qd_ptr, qa_ptr, swaps_ptr, e_before_ptr, e_out_ptr,
    rows, cols, stride_w, stride_is, stride_m, cycles,
    IS_NM: tl.constexpr, M: tl.constexpr, MPAD: tl.constexpr, HAS_SCORE: tl.constexpr,
    SIGN_CHECK: tl.constexpr, IMPROVE_CHECK: tl.constexpr, MOMENT_CHECK: tl.constexpr,
    NQ: tl.constexpr, TPAD: tl.constexpr, HPAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    live = r < rows
    threshold = tl.load(params_ptr)          # τ and L as float64 (a float argument would be fp32)
    seq_len = tl.load(params_ptr + 1)
    e = tl.load(e_ptr + r, mask=live, other=0.0)
    tl.store(e_before_ptr + r, e.to(tl.float32), mask=live)
    sign0 = sign_f64(e)
    active = live
    ptr_gp = tl.zeros([BLOCK_R], dtype=tl.int32)
    ptr_gn = tl.zeros([BLOCK_R], dtype=tl.int32)
    ptr_pn = tl.zeros([BLOCK_R], dtype=tl.int32)
    ptr_pp = tl.zeros([BLOCK_R], dtype=tl.int32)
    swaps = tl.zeros([BLOCK_R], dtype=tl.int32)
    w_row = w_ptr + r * stride_w
    if IS_NM:
        t_idx = tl.arange(0, HPAD)[None, :]
        hist_p = tl.full([BLOCK_R, HPAD], -1, dtype=tl.int64)
        hist_g = tl.full([BLOCK_R, HPAD], -1, dtype=tl.int64)
        jj = tl.arange(0, MPAD)[None, :].to(tl.int64)

    cycle = 0
    n_active = tl.sum(tl.where(active, 1, 0))
    while (cycle < cycles) & (n_active > 0):
        active = active & (tl.abs(e) > threshold)
        pos = e > 0
        ptr_g = tl.where(pos, ptr_gp, ptr_gn)
        g_at = r * (NQ * TPAD) + tl.where(pos, 0, TPAD) + ptr_g
        # loads masked by `live` only (not `active`): the four queue reads of a cycle issue together
        gcol = tl.load(queue_ptr + g_at, mask=live & (ptr_g < TPAD), other=-1)
        active = active & (gcol >= 0)
        ptr_gp += tl.where(active & pos, 1, 0)
        ptr_gn += tl.where(active & (pos == 0), 1, 0)
        gcol = tl.where(active, gcol, 0).to(tl.int64)
        if IS_NM:
            group = gcol // M
            used = tl.sum(tl.where((hist_p >= 0) & (hist_p // M == group[:, None]), 1, 0), axis=1)
            gc = group[:, None] * M + jj                               # [BLOCK_R, MPAD]
            gv = (jj < M) & active[:, None]
            kept = tl.load(mask_ptr + r[:, None] * stride_m + gc, mask=gv, other=1) == 0
            kept = kept & gv
            if HAS_SCORE:
                sc = tl.load(iscore_ptr + r[:, None] * stride_is + gc, mask=gv, other=0.0)
            else:
                wgrp = tl.load(w_row[:, None] + gc, mask=gv, other=0.0).to(tl.float32)
                sc = tl.abs(wgrp) * tl.load(scale_ptr + gc, mask=gv, other=0.0)
            key = ordered_key(sc, gc)
            # rank of each kept member among the group's kept members
            less = (key[:, None, :] < key[:, :, None]) & kept[:, None, :]   # [r, j, j']
            rank = tl.sum(tl.where(less, 1, 0), axis=2)
            sel = kept & (rank == used[:, None])
            has_partner = tl.sum(tl.where(sel, 1, 0), axis=1) > 0
            pcol = tl.sum(tl.where(sel, gc, 0), axis=1)
            proposing = active & has_partner
        else:
            ptr_p = tl.where(pos, ptr_pn, ptr_pp)
            p_at = r * (NQ * TPAD) + tl.where(pos, 2 * TPAD, 3 * TPAD) + ptr_p
            pcol = tl.load(queue_ptr + p_at, mask=live & (ptr_p < TPAD), other=-1)
            active = active & (pcol >= 0)
            ptr_pn += tl.where(active & pos, 1, 0)
            ptr_pp += tl.where(active & (pos == 0), 1, 0)
            pcol = tl.where(active, pcol, 0).to(tl.int64)
            proposing = active
        if IS_NM:
            wg = tl.load(w_row + gcol, mask=proposing, other=0.0).to(tl.float32)
            wp = tl.load(w_row + pcol, mask=proposing, other=0.0).to(tl.float32)
            dg = wg * tl.load(s_ptr + gcol, mask=proposing, other=0.0)
            dp = wp * tl.load(s_ptr + pcol, mask=proposing, other=0.0)
        else:
            # D (and A) of the queue entries were stored next to their columns by kernel 1
            dg = tl.load(qd_ptr + g_at, mask=live & (ptr_g < TPAD), other=0.0)
            dp = tl.load(qd_ptr + p_at, mask=live & (ptr_p < TPAD), other=0.0)
        e2 = (e + dp.to(tl.float64)) - dg.to(tl.float64)
        ok = proposing
        if SIGN_CHECK:
            ok = ok & (sign_f64(e2) == sign0)
        if IMPROVE_CHECK:
            ok = ok & (tl.abs(e2) < tl.abs(e))
        if MOMENT_CHECK:
            if IS_NM:
                ag = (tl.abs(wg) * tl.load(sq_ptr + gcol, mask=proposing, other=0.0)).to(tl.float64)
                ap = (tl.abs(wp) * tl.load(sq_ptr + pcol, mask=proposing, other=0.0)).to(tl.float64)
            else:
                ag = tl.load(qa_ptr + g_at, mask=proposing, other=0.0).to(tl.float64)
                ap = tl.load(qa_ptr + p_at, mask=proposing, other=0.0).to(tl.float64)
            dg64 = dg.to(tl.float64)
            dp64 = dp.to(tl.float64)
            delta = seq_len * (ap * ap - ag * ag) - (dp64 * dp64 - dg64 * dg64) + (e2 * e2 - e * e)
            ok = ok & (delta < 0)
        active = active & ((proposing == 0) | ok)
        accept = proposing & active
        if IS_NM:
            slot = accept[:, None] & (t_idx == swaps[:, None])
            hist_p = tl.where(slot, pcol[:, None], hist_p)
            hist_g = tl.where(slot, gcol[:, None], hist_g)
        else:
            tl.store(mask_ptr + r * stride_m + gcol, tl.zeros([BLOCK_R], dtype=tl.int8), mask=accept)
            tl.store(mask_ptr + r * stride_m + pcol, tl.full([BLOCK_R], 1, dtype=tl.int8), mask=accept)
        e = tl.where(accept, e2, e)
        swaps += tl.where(accept, 1, 0)
        cycle += 1
        n_active = tl.sum(tl.where(active, 1, 0))

    if IS_NM:
        row_mask = mask_ptr + r[:, None] * stride_m
        tl.store(row_mask + hist_g, tl.zeros([BLOCK_R, HPAD], dtype=tl.int8), mask=hist_g >= 0)
        tl.store(row_mask + hist_p, tl.full([BLOCK_R, HPAD], 1, dtype=tl.int8), mask=hist_p >= 0)
    tl.store(swaps_ptr + r, swaps, mask=live)
    tl.store(e_out_ptr + r, e.to(tl.float32), mask=live)

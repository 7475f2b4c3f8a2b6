"""Kernel 1 of 2: scores, the initial mask, the row error and the top-``T`` candidate queues.

One program per row of ``W`` ``[out, in]``; the whole row lives in registers as a
``[GPAD, MPAD]`` tile (N:M: one group of ``M`` columns per tile row; unstructured: ``[1, BLOCK]``
with ``BLOCK = next_pow2(in)``). Math (SPEC §2-§5, all float32 unless stated):

    D = w * S        G = div_rn(D, V^p)        A = |w| * sqrt(Q)
    score = |w| * init_col_scale   (or the given init_score row)
    key(x) = ordered_int32(x) * 2^32 + column          (unique; orders like a stable sort)

* Initial mask (unless given): unstructured: prune the ``k`` smallest score keys, found
  exactly by :func:`count_threshold` (bisection on counts; no sort). N:M: prune the columns
  whose key rank inside their group is ``< N`` (rank = a static loop over the ``M`` group
  members, each loaded as one strided ``[GPAD]`` column).
* ``e0 = Σ_{pruned} (double) D`` (float64).
* Queues, each in pop order = ascending *transformed key* ``tk``:
  ``grow+`` (pruned, G > 0, tk = -key(G)), ``grow-`` (pruned, G < 0, tk = key(G)),
  ``prune-`` (kept, D < 0, tk = key(A)), ``prune+`` (kept, D > 0, tk = key(A)); N:M uses only
  the two grow queues. Top-``T`` without a full sort: a threshold keeping between
  ``depth = min(T, in)`` and ``CAP`` members (:func:`count_threshold`), compaction of those
  ``<= CAP`` keys through a per-row scratch line (cumsum positions), a ``CAP``-wide bitonic
  ``tl.sort``, and the first ``TPAD`` columns written out (``-1`` = past the end).

Memory traffic per row: one read of the ``W`` row (2 B/weight for fp16), the ``[in]`` column
vectors (L2-resident, shared by all rows), the initial mask or score when given; one write of
the mask (1 B/weight), ``8 B`` of ``e0`` and ``NQ * TPAD * 4 B`` of queues (+ the scratch line,
``<= NQ * CAP * 8 B``, L2-resident). The N:M rank loop re-reads the row once more (L1/L2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INT64_MAX, count_threshold, key_column, ordered_key


@triton.jit
def _init_score(w_ptr, scale_ptr, iscore_ptr, row, col, valid, stride_w, stride_is,
                HAS_SCORE: tl.constexpr):
    """The init method's float32 score at ``col`` of ``row`` (SPEC §2)."""
    if HAS_SCORE:
        return tl.load(iscore_ptr + row * stride_is + col, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * stride_w + col, mask=valid, other=0.0).to(tl.float32)
    return tl.abs(w) * tl.load(scale_ptr + col, mask=valid, other=0.0)


@triton.jit
def select_kernel(
    w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,   # inputs
    mask_ptr, e0_ptr, queue_ptr, scratch_ptr,                           # outputs / scratch
    cols, stride_w, stride_is, stride_im, stride_m, pruned_per_row, depth,
    IS_NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
    GPAD: tl.constexpr, MPAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr,
    NQ: tl.constexpr, TPAD: tl.constexpr, CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gi = tl.arange(0, GPAD)[:, None].to(tl.int64)
    jj = tl.arange(0, MPAD)[None, :].to(tl.int64)
    if IS_NM:
        col = gi * M + jj
        valid = (jj < M) & (col < cols)
    else:
        col = gi * MPAD + jj
        valid = col < cols

    w = tl.load(w_ptr + row * stride_w + col, mask=valid, other=0.0).to(tl.float32)
    d = w * tl.load(s_ptr + col, mask=valid, other=0.0)
    g = tl.math.div_rn(d, tl.load(vp_ptr + col, mask=valid, other=1.0))
    a = tl.abs(w) * tl.load(sq_ptr + col, mask=valid, other=0.0)

    # ---- SPEC §2: the initial mask ---------------------------------------------------------
    if HAS_MASK:
        pruned = tl.load(imask_ptr + row * stride_im + col, mask=valid, other=0) != 0
    else:
        skey = ordered_key(_init_score(w_ptr, scale_ptr, iscore_ptr, row, col, valid,
                                       stride_w, stride_is, HAS_SCORE), col)
        if IS_NM:
            rank = tl.zeros([GPAD, MPAD], dtype=tl.int32)
            for j2 in tl.static_range(M):
                c2 = gi * M + j2                                  # [GPAD, 1]: member j2 of each group
                v2 = c2 < cols
                k2 = ordered_key(_init_score(w_ptr, scale_ptr, iscore_ptr, row, c2, v2,
                                             stride_w, stride_is, HAS_SCORE), c2)
                rank += tl.where(k2 < skey, 1, 0)
            pruned = valid & (rank < N)
        else:
            flat_key = tl.reshape(skey, [GPAD * MPAD])
            flat_valid = tl.reshape(valid, [GPAD * MPAD])
            th = count_threshold(flat_key, flat_valid, pruned_per_row, pruned_per_row)
            pruned = valid & (skey <= th)
    tl.store(mask_ptr + row * stride_m + col, pruned.to(tl.int8), mask=valid)

    # ---- SPEC §3: the row error, float64 -----------------------------------------------------
    e0 = tl.sum(tl.sum(tl.where(pruned, d.to(tl.float64), 0.0), axis=1), axis=0)
    tl.store(e0_ptr + row, e0)

    # ---- SPEC §4/§5: top-T of each queue, in pop order ---------------------------------------
    BLOCK: tl.constexpr = GPAD * MPAD
    fcol = tl.reshape(col, [BLOCK])
    fpruned = tl.reshape(pruned, [BLOCK])
    fkept = tl.reshape(valid & (pruned == 0), [BLOCK])
    fd = tl.reshape(d, [BLOCK])
    fg = tl.reshape(g, [BLOCK])
    slot = tl.arange(0, CAP)
    scratch = scratch_ptr + row * CAP
    for q in tl.static_range(NQ):
        if q == 0:      # grow+: G descending, ties higher column first
            member = fpruned & (fg > 0)
            tkey = -ordered_key(fg, fcol)
        elif q == 1:    # grow-: G ascending, ties lower column first
            member = fpruned & (fg < 0)
            tkey = ordered_key(fg, fcol)
        elif q == 2:    # prune-: A ascending, ties lower column first
            member = fkept & (fd < 0)
            tkey = ordered_key(tl.reshape(a, [BLOCK]), fcol)
        else:           # prune+
            member = fkept & (fd > 0)
            tkey = ordered_key(tl.reshape(a, [BLOCK]), fcol)
        th = count_threshold(tkey, member, depth, CAP)
        cand = member & (tkey <= th)
        n_cand = tl.sum(tl.where(cand, 1, 0))
        where_to = tl.cumsum(tl.where(cand, 1, 0), axis=0) - 1
        tl.debug_barrier()                 # the previous queue's reads of the scratch line are done
        tl.store(scratch + where_to, tkey, mask=cand)
        tl.debug_barrier()                 # the compacted line is visible to every thread
        head = tl.sort(tl.load(scratch + slot, mask=slot < n_cand, other=INT64_MAX))
        if q == 0:
            head_col = key_column(-head)
        else:
            head_col = key_column(head)
        head_col = tl.where(slot < n_cand, head_col, -1)
        tl.store(queue_ptr + (row * NQ + q) * TPAD + slot, head_col, mask=slot < TPAD)

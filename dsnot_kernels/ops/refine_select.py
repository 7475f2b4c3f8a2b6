"""Kernel 1 of 2: scores, the initial mask, the row error and the top-``T`` candidate queues.

One row of ``W`` ``[out, in]`` at a time per program, the whole row in registers as a
``[GPAD, MPAD]`` tile (N:M: one group of ``M`` columns per tile row; unstructured: ``[1, BLOCK]``
with ``BLOCK = next_pow2(in)``). The launcher starts one program per row, or (``SEEDED``) a few
per SM that loop over the rows and seed each unstructured row's ``k``-th search from the
program's previous row (:func:`._common.kth32_seeded`). Math (SPEC §2-§5, all float32 unless
stated):

    D = w * S        G = div_rn(D, V^p)        A = |w| * sqrt(Q)
    score = |w| * init_col_scale   (or the given init_score row)
    key(x) = ordered_int32(x) * 2^32 + column          (unique; orders like a stable sort)

* Initial mask (unless given): unstructured: prune the ``k`` smallest score keys, found
  exactly by :func:`threshold32` (interpolation/bisection on int32 counts; no sort; seeded:
  one reduction for the mean score, then ~5 probes instead of ~10). N:M: prune the columns
  whose key rank inside their group is ``< N`` (rank = a static loop over the ``M`` group
  members, each loaded as one strided ``[GPAD]`` column).
* ``e0 = Σ_{pruned} (double) D`` (float64).
* Queues, each in pop order = ascending *transformed key* ``tk``:
  ``grow+`` (pruned, G > 0, tk = -key(G)), ``grow-`` (pruned, G < 0, tk = key(G)),
  ``prune-`` (kept, D < 0, tk = key(A)), ``prune+`` (kept, D > 0, tk = key(A)); N:M uses only
  the two grow queues. Top-``T`` without a full sort: a threshold keeping between
  ``depth = min(T, in)`` and ``CAP`` members of each queue (``JOINT``: all queues searched in
  lockstep by :func:`queue_thresholds`, one block reduction per probe for all of them;
  seeded: one more reduction first counts at each queue's threshold of the program's previous
  row, ~6.5 -> ~0.4 probes on later rows; else
  :func:`threshold32` per queue), compaction of
  those ``<= CAP`` keys through a per-row ``[NQ, CAP]`` scratch block (one int64 cumsum for all
  queues: they are disjoint, each counts in its own 16-bit field), one ``[NQ, CAP]`` bitonic
  ``tl.sort`` along the last axis, and the first ``TPAD`` columns written out (``-1`` = past
  the end) with their ``D`` (and ``A`` when the moment check is on), so that kernel 2 needs
  no gathers from ``W`` for unstructured rows.

Memory traffic per row: one read of the ``W`` row (2 B/weight for fp16), the ``[in]`` column
vectors (L2-resident, shared by all rows), the initial mask or score when given; one write of
the mask (1 B/weight), ``8 B`` of ``e0`` and ``NQ * TPAD * (8 or 12) B`` of queues (+ the
scratch block, ``<= NQ * CAP * 8 B``, L2-resident). The N:M rank loop re-reads the row once more (L1/L2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (INT64_MAX, init_key, init_score, kth32_seeded, line_count, line_field, pick,
                      queue_id_key, queue_key, queue_seed_learn, queue_seed_state, queue_thresholds,
                      seed_learn, seed_predict, seed_state, store_queues, threshold32)


@triton.jit
def select_kernel(
    w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,   # inputs
    mask_ptr, e0_ptr, queue_ptr, qd_ptr, qa_ptr, scratch_ptr,           # outputs / scratch
    rows, cols, stride_w, stride_is, stride_im, stride_m, pruned_per_row, depth,
    IS_NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
    GPAD: tl.constexpr, MPAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr,
    NQ: tl.constexpr, TPAD: tl.constexpr, CAP: tl.constexpr, STORE_A: tl.constexpr,
    JOINT: tl.constexpr, SEEDED: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gi = tl.arange(0, GPAD)[:, None].to(tl.int64)
    jj = tl.arange(0, MPAD)[None, :].to(tl.int64)
    if IS_NM:
        col = gi * M + jj
        valid = (jj < M) & (col < cols)
    else:
        col = gi * MPAD + jj
        valid = col < cols
    # the previous row's k-th score over its mean score and the last miss: this program's
    # prediction of the next row's k-th key (see _common.seed_predict), used when SEEDED
    ratio, miss, have_ratio = seed_state()
    # and of its joint queue search: each queue's previous threshold key (see queue_thresholds)
    q_seed, q_miss, q_have = queue_seed_state(NQ)
    if SEEDED:
        # a few programs per SM loop over the rows
        for row_i in range(pid, rows, nprog):
            row = (pid * 0 + row_i).to(tl.int64)     # (a tensor also under the interpreter)
            ratio, miss, have_ratio, q_seed, q_miss, q_have = _select_row(
                w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,
                mask_ptr, e0_ptr, queue_ptr, qd_ptr, qa_ptr, scratch_ptr,
                row, col, valid, gi, cols, stride_w, stride_is, stride_im, stride_m, pruned_per_row, depth,
                ratio, miss, have_ratio, q_seed, q_miss, q_have, IS_NM, N, M, GPAD, MPAD, HAS_MASK,
                HAS_SCORE, NQ, TPAD, CAP, STORE_A, JOINT, SEEDED)
    else:
        # one program per row (no loop: the register allocation of the one-row kernel)
        _select_row(w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,
                    mask_ptr, e0_ptr, queue_ptr, qd_ptr, qa_ptr, scratch_ptr,
                    pid.to(tl.int64), col, valid, gi, cols, stride_w, stride_is, stride_im, stride_m,
                    pruned_per_row, depth, ratio, miss, have_ratio, q_seed, q_miss, q_have, IS_NM, N, M,
                    GPAD, MPAD, HAS_MASK, HAS_SCORE, NQ, TPAD, CAP, STORE_A, JOINT, SEEDED)


@triton.jit
def _select_row(
    w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,
    mask_ptr, e0_ptr, queue_ptr, qd_ptr, qa_ptr, scratch_ptr,
    row, col, valid, gi, cols, stride_w, stride_is, stride_im, stride_m, pruned_per_row, depth,
    ratio, miss, have_ratio, q_seed, q_miss, q_have,
    IS_NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr, GPAD: tl.constexpr, MPAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr, NQ: tl.constexpr, TPAD: tl.constexpr,
    CAP: tl.constexpr, STORE_A: tl.constexpr, JOINT: tl.constexpr, SEEDED: tl.constexpr,
):
    """One row of :func:`select_kernel`; returns the k-th-score and queue-threshold
    predictors after it."""
    w = tl.load(w_ptr + row * stride_w + col, mask=valid, other=0.0).to(tl.float32)
    d = w * tl.load(s_ptr + col, mask=valid, other=0.0)
    g = tl.math.div_rn(d, tl.load(vp_ptr + col, mask=valid, other=1.0))
    a = tl.abs(w) * tl.load(sq_ptr + col, mask=valid, other=0.0)

    # ---- SPEC §2: the initial mask ---------------------------------------------------------
    if HAS_MASK:
        pruned = tl.load(imask_ptr + row * stride_im + col, mask=valid, other=0) != 0
    else:
        w_row = w_ptr + row * stride_w
        iscore_row = iscore_ptr + row * stride_is
        score = init_score(w_row, scale_ptr, iscore_row, col, valid, HAS_SCORE)
        sv = init_key(score, HAS_SCORE)
        if IS_NM:
            rank = tl.zeros([GPAD, MPAD], dtype=tl.int32)
            for j2 in tl.static_range(M):
                c2 = gi * M + j2                                  # [GPAD, 1]: member j2 of each group
                v2 = c2 < cols
                k2 = init_key(init_score(w_row, scale_ptr, iscore_row, c2, v2, HAS_SCORE), HAS_SCORE)
                # (k2, c2) < (sv, col): the stable-sort rank inside the group
                rank += tl.where((k2 < sv) | ((k2 == sv) & (c2 < col)), 1, 0)
            pruned = valid & (rank < N)
        else:
            flat_v = tl.reshape(sv, [GPAD * MPAD])
            flat_c = tl.reshape(col, [GPAD * MPAD]).to(tl.int32)
            flat_valid = tl.reshape(valid, [GPAD * MPAD])
            if SEEDED:
                # one more reduction (the mean score) for a seeded search of ~5 probes instead of ~10
                mean_score = tl.sum(tl.sum(tl.where(valid, score, 0.0), axis=1), axis=0) / cols
                seed, spread = seed_predict(mean_score, ratio, miss)
                # (k = 0 prunes nothing: the mask below ignores the threshold of its k = 1 search)
                tv, tt = kth32_seeded(flat_v, flat_c, flat_valid, pruned_per_row + (pruned_per_row == 0),
                                      seed, spread, have_ratio != 0)
                ratio, miss, have_ratio = seed_learn(tv, seed, mean_score, ratio, miss, have_ratio)
            else:
                tv, tt = threshold32(flat_v, flat_c, flat_valid, pruned_per_row, pruned_per_row)
            pruned = valid & ((sv < tv) | ((sv == tv) & (col <= tt))) & (pruned_per_row > 0)
    tl.store(mask_ptr + row * stride_m + col, pruned.to(tl.int8), mask=valid)

    # ---- SPEC §3: the row error, float64 -----------------------------------------------------
    e0 = tl.sum(tl.sum(tl.where(pruned, d.to(tl.float64), 0.0), axis=1), axis=0)
    tl.store(e0_ptr + row, e0)

    # ---- SPEC §4/§5: top-T of each queue, in pop order ---------------------------------------
    # The queues are disjoint, so one int32 sort value ``v`` and tie key per weight serve all:
    #   q0 grow+  (pruned, G > 0): v = ~ord(G), tie = -col   (G descending, higher column first)
    #   q1 grow-  (pruned, G < 0): v =  ord(G), tie =  col
    #   q2 prune- (kept,   D < 0): v =  ord(A), tie =  col   (unstructured only)
    #   q3 prune+ (kept,   D > 0): v =  ord(A), tie =  col
    BLOCK: tl.constexpr = GPAD * MPAD
    fcol = tl.reshape(col, [BLOCK]).to(tl.int32)
    qid, v = queue_id_key(tl.reshape(pruned, [BLOCK]), tl.reshape(valid & (pruned == 0), [BLOCK]),
                          tl.reshape(d, [BLOCK]), tl.reshape(g, [BLOCK]), tl.reshape(a, [BLOCK]), NQ)
    tie = tl.where(qid == 0, -fcol, fcol)
    if JOINT:
        # all queue thresholds in lockstep: one block reduction per probe for all queues
        tvq, ttq, searched = queue_thresholds(v, tie, qid, depth, CAP, cols, q_seed,
                                              tl.maximum(2 * q_miss, 4096), q_have != 0, NQ, SEEDED)
        q_seed, q_miss, q_have = queue_seed_learn(tvq, searched, q_seed, q_miss, q_have)
        tv = pick(qid, tvq, NQ)
        tt = pick(qid, ttq, NQ)
        sel = (qid >= 0) & ((v < tv) | ((v == tv) & (tie <= tt)))
    else:
        sel = qid > NQ                                 # all False
        for q in tl.static_range(NQ):
            member = qid == q
            tv, tt = threshold32(v, tie, member, depth, CAP)
            sel = sel | (member & ((v < tv) | ((v == tv) & (tie <= tt))))
    # one scan for all queues: a count field per queue (counts <= CAP)
    field = line_field(qid, sel, CAP)
    pos = line_count(tl.cumsum(field, axis=0), qid, CAP)
    tl.store(scratch_ptr + row * (NQ * CAP) + (qid & 3) * CAP + pos - 1, queue_key(v, tie), mask=sel)
    counts = tl.sum(field, axis=0)
    tl.debug_barrier()                 # the compacted lines are visible to every thread
    qq = tl.arange(0, NQ)[:, None]
    slot = tl.arange(0, CAP)[None, :]
    n_q = line_count(counts, qq, CAP)
    live = slot < n_q
    head = tl.sort(tl.load(scratch_ptr + row * (NQ * CAP) + qq * CAP + slot, mask=live,
                           other=INT64_MAX), dim=1)
    store_queues(head, row, w_ptr + row * stride_w, s_ptr, sq_ptr, queue_ptr, qd_ptr, qa_ptr,
                 NQ, TPAD, STORE_A)
    return ratio, miss, have_ratio, q_seed, q_miss, q_have

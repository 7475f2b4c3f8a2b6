"""Kernel 1 of 2 (streamed form): scores, initial mask, row error and top-``T`` queues.

Same outputs as :mod:`refine_select` (SPEC §2-§5), organised for occupancy instead of keeping a
row in registers. A fixed number of programs (``grid = SMs x programs per SM``) loop over the
rows; each program owns a scratch line of ``in`` int32 *keys* and ``in`` int8 *set ids* and
walks the row in ``CHUNK``-column chunks. Every selection pass re-reads the line (5 B per
column: 20 KB per program at in = 4096, meant to stay in L1/L2; at 8 programs per SM and
in = 11008 the lines total ~58 MB on an H100, more than its 50 MB L2) instead of holding the row
in registers, so a program needs few registers (128 at 4 warps, the unstructured launch capped
there: four programs per SM), several programs share an SM, and their reduction chains
overlap. ``CHUNK`` and the mask pass's ``MASK_CHUNK`` must be at least the program's thread
count on a GPU (the launcher ensures it): the mask pass reads each key and then overwrites it.

Per row:

1. unstructured, no given mask: keys = ordered_int32(init score) -> the exact ``k``-th key
   by :func:`_kth_search` (interpolation/bisection on streamed counts, three keys counted
   per pass, seeded from the program's previous row; tie split by column);
2. one pass per chunk: the initial mask (threshold / given mask / N:M group rank) is written,
   ``e0 = Σ_{pruned} (double) D`` accumulated, and each weight's queue id and queue key stored
   (``D = w*S``, ``G = div_rn(D, V^p)``, ``A = |w|*sqrt(Q)``):
   q0 grow+ (pruned, G > 0, key ~ord(G), tie -col), q1 grow- (pruned, G < 0, ord(G), col),
   q2 prune- (kept, D < 0, ord(A), col), q3 prune+ (kept, D > 0, ord(A), col);
3. thresholds keeping ``depth..CAP`` members of every queue: ``JOINT`` (default): one
   stats pass and one counting pass per probe for all queues at once (:func:`_joint_search`,
   16-bit count fields per queue; the stats pass also counts at each queue's threshold key
   of the program's previous row -+ twice its last miss, which usually ends the search),
   then one pass compacting every queue's members
   (:func:`_compact_joint`); else per queue :func:`_search` and :func:`_compact`. Compacted
   entries are int64 keys (key * 2^32 + tie, ascending = pop order) in each queue's ``[CAP]``
   line; then one ``[NQ, CAP]`` ``tl.sort`` and the first ``TPAD`` entries written with their
   ``D`` (and ``A``), ``-1`` past the end.

Passes over the line per row (unstructured, no given mask): 1 key pass, then for the exact
``k``-th key 1 stats pass with the two seed counts and ~4.5 probe passes (40 benchmark rows of
4096 columns at 60%, 4 rows per program, counted under the interpreter; ~7.3 for a program's
first row; real SmolLM2 rows: ``benchmarks/PERF_NOTES.md``),
1 mask/queue-key pass, then joint: 1 + max over queues of the probes + 1, the probes ~6.5
for a program's first row and ~0.4 for its later ones (``benchmarks/count_passes.py``: 1.4
per row at 16 rows per program, 1.9 at 4; 2:4: 5.9 unseeded, 0.8 and 1.7); serial: the sum
over the four queues of 1 + probes + 1 (~22).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, any_true, combine5, count_min_max,
                      init_key, init_score, joint_step, joint_tie_step, line_count, line_field, pick,
                      queue_field, queue_id_key, queue_key,
                      queue_seed_learn, queue_seed_state, queue_stats_merge, queue_stats_parts,
                      queue_stats_reduce, search_probe, search_probes3, search_start, search_step,
                      seed_learn, seed_predict, seed_probes, seed_state, seed_step, seeded_search_start,
                      store_queues, tie_start, tie_step, unpack_counts)


@triton.jit
def _member(keys, sets, idx, valid, q, HAS_SET: tl.constexpr):
    """``(key, member)`` of the chunk ``idx``: members of set ``q`` (all valid ones without sets)."""
    v = tl.load(keys + idx, mask=valid, other=INT32_MAX)
    member = valid
    if HAS_SET:
        member = member & (tl.load(sets + idx, mask=valid, other=-1) == q)
    return v, member


@triton.jit
def _count(keys, sets, cols, q, t, HAS_SET: tl.constexpr, CHUNK: tl.constexpr):
    """``#{members of set q with key <= t}`` over the line (one block reduction)."""
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        valid = idx < cols
        v, member = _member(keys, sets, idx, valid, q, HAS_SET)
        acc += tl.where(member & (v <= t), 1, 0)
    return tl.sum(acc, axis=0)


@triton.jit
def _add3(a1, a2, a3, b1, b2, b3):
    return a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _count3(keys, cols, t1, t2, t3, CHUNK: tl.constexpr):
    """``#{key <= t}`` over the whole key line for three keys in one pass (one block reduction;
    each ``t < INT32_MAX``, so the padding past ``cols`` is never counted)."""
    a1 = tl.zeros([CHUNK], dtype=tl.int32)
    a2 = tl.zeros([CHUNK], dtype=tl.int32)
    a3 = tl.zeros([CHUNK], dtype=tl.int32)
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        v = tl.load(keys + idx, mask=idx < cols, other=INT32_MAX)
        a1 += tl.where(v <= t1, 1, 0)
        a2 += tl.where(v <= t2, 1, 0)
        a3 += tl.where(v <= t3, 1, 0)
    return tl.reduce((a1, a2, a3), 0, _add3)


@triton.jit
def _count_tie(keys, sets, cols, q, value, t, NEG_TIE: tl.constexpr, HAS_SET: tl.constexpr,
               CHUNK: tl.constexpr):
    """``#{members of set q with key == value and tie <= t}`` (tie = col, or -col for grow+)."""
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        valid = idx < cols
        v, member = _member(keys, sets, idx, valid, q, HAS_SET)
        tie = -idx if NEG_TIE else idx
        acc += tl.where(member & (v == value) & (tie <= t), 1, 0)
    return tl.sum(acc, axis=0)


@triton.jit
def _search(keys, sets, cols, q, lo_count, hi_count, NEG_TIE: tl.constexpr, HAS_SET: tl.constexpr,
            CHUNK: tl.constexpr):
    """``(tv, tt)``: ``sel = member & ((key < tv) | ((key == tv) & (tie <= tt)))`` has
    ``lo_count <= #sel <= hi_count`` (all members when they are at most ``hi_count``).

    The search of :func:`._common.threshold32` (interpolated probes, bisection after a probe
    that did not halve the interval, a tie split by column), with every count streamed from
    the program's key line.
    """
    # one pass: member count, smallest and largest key
    n_acc = tl.zeros([CHUNK], dtype=tl.int32)
    lo_acc = tl.full([CHUNK], INT32_MAX, dtype=tl.int32)
    hi_acc = tl.full([CHUNK], INT32_MIN, dtype=tl.int32)
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        valid = idx < cols
        v, member = _member(keys, sets, idx, valid, q, HAS_SET)
        n_acc += tl.where(member, 1, 0)
        lo_acc = tl.minimum(lo_acc, tl.where(member, v, INT32_MAX))
        hi_acc = tl.maximum(hi_acc, tl.where(member, v, INT32_MIN))
    n, vmin, vmax = count_min_max(n_acc, lo_acc, hi_acc)
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = search_start(
        n, vmin, vmax, lo_count, hi_count)
    # counting probes, one pass each, until a count lands in [lo_count, hi_count] or the
    # bracket (lo, hi] closes on one key
    steps = 0
    while searching & (hi - lo > 1) & (steps < 70):
        mid = search_probe(lo, hi, c_lo, c_hi, target, bisect)
        c = _count(keys, sets, cols, q, mid.to(tl.int32), HAS_SET, CHUNK)
        lo, hi, c_lo, c_hi, tv, searching, bisect = search_step(c, mid, lo, hi, c_lo, c_hi, tv,
                                                                searching, lo_count, hi_count)
        steps += 1
    return _split_ties(keys, sets, cols, q, lo, hi, c_lo, tv, tt, searching, lo_count, hi_count,
                       NEG_TIE, HAS_SET, CHUNK)


@triton.jit
def _probe_line3(keys, cols, lo, hi, c_lo, c_hi, tv, searching, target, bisect, lo_count, hi_count,
                 CHUNK: tl.constexpr):
    """Counting probes on the whole key line until a count lands in ``[lo_count, hi_count]``
    or the bracket ``(lo, hi]`` closes on one key; three
    keys per pass (:func:`._common.search_probes3`, each applied like a seed count): fewer
    dependent passes than :func:`_search`'s one, for a little more work in each. Returns
    ``(lo, hi, c_lo, c_hi, tv, searching)``."""
    steps = 0
    while searching & (hi - lo > 1) & (steps < 70):
        span = hi - lo
        t1, t2, t3 = search_probes3(lo, hi, c_lo, c_hi, target, bisect)
        c1, c2, c3 = _count3(keys, cols, t1.to(tl.int32), t2.to(tl.int32), t3.to(tl.int32), CHUNK)
        # each count narrows the bracket if its key still lies inside it, in ascending order
        lo, hi, c_lo, c_hi, tv, searching = seed_step(c1, t1, searching, lo, hi, c_lo, c_hi, tv, searching,
                                                      lo_count, hi_count)
        lo, hi, c_lo, c_hi, tv, searching = seed_step(c2, t2, searching, lo, hi, c_lo, c_hi, tv, searching,
                                                      lo_count, hi_count)
        lo, hi, c_lo, c_hi, tv, searching = seed_step(c3, t3, searching, lo, hi, c_lo, c_hi, tv, searching,
                                                      lo_count, hi_count)
        bisect = 2 * (hi - lo) > span
        steps += 1
    return lo, hi, c_lo, c_hi, tv, searching


@triton.jit
def _split_ties(keys, sets, cols, q, lo, hi, c_lo, tv, tt, searching, lo_count, hi_count,
                NEG_TIE: tl.constexpr, HAS_SET: tl.constexpr, CHUNK: tl.constexpr):
    """``(tv, tt)`` of a search that ended still ``searching`` on a bracket ``(lo, hi = lo + 1]``:
    the tie block at key ``hi`` straddles the wanted count, so it is split by bisection on the
    tie key. A finished search's ``(tv, tt)`` come back unchanged."""
    if searching:
        value = hi.to(tl.int32)
        tlo, thi, tt, going = tie_start(lo, tt, searching, cols)
        while going:
            mid = tlo + (thi - tlo) // 2
            c = _count_tie(keys, sets, cols, q, value, mid.to(tl.int32), NEG_TIE, HAS_SET, CHUNK)
            tlo, thi, tt, going = tie_step(c, mid, tlo, thi, tt, lo_count - c_lo, hi_count - c_lo)
        tv = value
    return tv, tt


@triton.jit
def _kth_search(keys, cols, k, seed, spread, use_seed, CHUNK: tl.constexpr):
    """``(tv, tt)`` of the ``k``-th smallest ``(key, column)`` of the key line (``k >= 1``):
    ``(key < tv) | ((key == tv) & (col <= tt))`` selects exactly ``k`` columns.

    :func:`_search` with additions that cut the streamed passes (counted under the interpreter
    on the benchmark's rows, 4096 columns at 60%, 10 rows per program: ~10.4 -> ~3.4 probe
    passes per row, benchmarks/PERF_NOTES.md):

    - a *seed*: the launcher's row loop predicts this row's ``k``-th key from the previous row
      of the same program (the previous ``k``-th value over its mean score, times this row's
      mean score) and the stats pass also counts at ``seed -+ spread``, which usually brackets
      the answer tightly before the first probe (any seed gives the same answer: seeds are
      only probes, used when they fall inside the bracket);
    - *three keys per pass* (:func:`_probe_line3`): the interpolated guess and one member's
      width either side, so a guess that lands a few columns off still narrows the bracket
      to those columns (10 rows per program: ~6.1 -> ~3.4 passes per row).

    A register endgame (the last few bracketed columns copied to scratch and ranked in
    registers: ~2 fewer probe passes per row, but its copy pass is a scan with ~4x a probe
    pass's instructions and 9 barriers per chunk in the sm_90 code) was measured out by
    instruction and barrier counts and removed (``benchmarks/PERF_NOTES.md``).

    A tie block at the final key ends in :func:`_search`'s tie split.
    """
    t_lo, t_hi = seed_probes(seed, spread)
    # the stats pass walks narrower tiles: five accumulators
    SCH: tl.constexpr = CHUNK // 4 if CHUNK >= 4 else 1
    n_acc = tl.zeros([SCH], dtype=tl.int32)
    lo_acc = tl.full([SCH], INT32_MAX, dtype=tl.int32)
    hi_acc = tl.full([SCH], INT32_MIN, dtype=tl.int32)
    s1_acc = tl.zeros([SCH], dtype=tl.int32)
    s2_acc = tl.zeros([SCH], dtype=tl.int32)
    for c0 in range(0, cols, SCH):
        idx = c0 + tl.arange(0, SCH)
        valid = idx < cols
        v = tl.load(keys + idx, mask=valid, other=INT32_MAX)
        n_acc += tl.where(valid, 1, 0)
        lo_acc = tl.minimum(lo_acc, tl.where(valid, v, INT32_MAX))
        hi_acc = tl.maximum(hi_acc, tl.where(valid, v, INT32_MIN))
        s1_acc += tl.where(valid & (v <= t_lo), 1, 0)
        s2_acc += tl.where(valid & (v <= t_hi), 1, 0)
    n, vmin, vmax, c1, c2 = tl.reduce((n_acc, lo_acc, hi_acc, s1_acc, s2_acc), 0, combine5)
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = seeded_search_start(
        n, vmin, vmax, c1, c2, t_lo, t_hi, k, k, use_seed)
    lo, hi, c_lo, c_hi, tv, searching = _probe_line3(keys, cols, lo, hi, c_lo, c_hi, tv, searching,
                                                     target, bisect, lo_count, hi_count, CHUNK)
    # (a tie block at key hi straddles the count: split by column)
    return _split_ties(keys, keys, cols, 0, lo, hi, c_lo, tv, tt, searching, lo_count, hi_count,
                       False, False, CHUNK)


@triton.jit
def _compact(keys, sets, line, cols, q, lo, tv, tt, NEG_TIE: tl.constexpr, HAS_SET: tl.constexpr,
             CHUNK: tl.constexpr):
    """Store :func:`._common.queue_key` ``(key, tie)`` of the members of set ``q`` with
    ``key > lo`` and ``(key, tie) <= (tv, tt)`` into ``line``, in column order."""
    carry = 0
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        valid = idx < cols
        v, member = _member(keys, sets, idx, valid, q, HAS_SET)
        tie = -idx if NEG_TIE else idx
        sel = member & (v.to(tl.int64) > lo) & ((v < tv) | ((v == tv) & (tie <= tt)))
        pos = carry + tl.cumsum(sel.to(tl.int32), axis=0)
        tl.store(line + pos - 1, queue_key(v, tie), mask=sel)
        carry += tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _line(keys, sets, idx, valid):
    """``(key, qid)`` of the chunk ``idx`` (qid -1 = in no queue)."""
    v = tl.load(keys + idx, mask=valid, other=INT32_MAX)
    return v, tl.load(sets + idx, mask=valid, other=-1).to(tl.int32)


@triton.jit
def _joint_search(keys, sets, cols, lo_count, hi_count, seed, spread, use_seed,
                  NQ: tl.constexpr, CHUNK: tl.constexpr):
    """Per-queue ``(tv, tt, searched)`` (each ``[NQ]``): :func:`._common.queue_thresholds` on
    the streamed key line, i.e. every queue's :func:`_search` in lockstep, one pass per probe
    for all queues; ``searched``: the queue had more than ``hi_count`` members (``tv`` is then
    its threshold key, the next row's seed).

    Seeded like the ``k``-th search: the stats pass also counts every queue's members at its
    ``seed -+ spread`` (``[NQ]`` keys, used where ``use_seed``), which usually lands in or
    brackets ``[lo_count, hi_count]`` before the first probe. A seed is only a probe: any seed
    gives the same thresholds."""
    # one pass: member count, smallest and largest key of every queue, and the seed counts
    # (narrower tiles: eleven accumulators)
    SCH: tl.constexpr = CHUNK // 4 if CHUNK >= 4 else 1
    t_lo, t_hi = seed_probes(seed, spread)
    acc = queue_stats_parts(tl.full([SCH], INT32_MAX, tl.int32), tl.full([SCH], -1, tl.int32), NQ)
    at_lo = tl.zeros([SCH], dtype=tl.int64)
    at_hi = tl.zeros([SCH], dtype=tl.int64)
    for c0 in range(0, cols, SCH):
        idx = c0 + tl.arange(0, SCH)
        v, qid = _line(keys, sets, idx, idx < cols)
        parts = queue_stats_parts(v, qid, NQ)
        acc = queue_stats_merge(acc, parts)
        at_lo += tl.where(v <= pick(qid, t_lo, NQ), parts[0], 0)       # parts[0]: the queue's field
        at_hi += tl.where(v <= pick(qid, t_hi, NQ), parts[0], 0)
    n, vmin, vmax = queue_stats_reduce(acc, NQ)
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = seeded_search_start(
        n, vmin, vmax, unpack_counts(tl.sum(at_lo, axis=0), NQ), unpack_counts(tl.sum(at_hi, axis=0), NQ),
        t_lo, t_hi, lo_count, hi_count, use_seed)
    going = searching & (hi - lo > 1)
    steps = 0
    while any_true(going) & (steps < 70):
        mid = search_probe(lo, hi, c_lo, c_hi, target, bisect).to(tl.int32)
        counts = tl.zeros([CHUNK], dtype=tl.int64)
        for c0 in range(0, cols, CHUNK):
            idx = c0 + tl.arange(0, CHUNK)
            v, qid = _line(keys, sets, idx, idx < cols)
            counts += tl.where(v <= pick(qid, mid, NQ), queue_field(qid), 0)
        c = unpack_counts(tl.sum(counts, axis=0), NQ)
        lo, hi, c_lo, c_hi, tv, searching, bisect, going = joint_step(
            c, mid.to(tl.int64), lo, hi, c_lo, c_hi, tv, searching, bisect, going, lo_count, hi_count)
        steps += 1
    if any_true(searching):
        # tie blocks at key hi straddle the wanted counts: split them by the tie key
        value = hi.to(tl.int32)
        tlo, thi, tt, tgoing = tie_start(lo, tt, searching, cols)
        while any_true(tgoing):
            mid = tlo + (thi - tlo) // 2
            counts = tl.zeros([CHUNK], dtype=tl.int64)
            for c0 in range(0, cols, CHUNK):
                idx = c0 + tl.arange(0, CHUNK)
                v, qid = _line(keys, sets, idx, idx < cols)
                tie = tl.where(qid == 0, -idx, idx)
                hit = (v == pick(qid, value, NQ)) & (tie <= pick(qid, mid.to(tl.int32), NQ))
                counts += tl.where(hit, queue_field(qid), 0)
            c = unpack_counts(tl.sum(counts, axis=0), NQ)
            tlo, thi, tt, tgoing = joint_tie_step(c, mid, tlo, thi, tt, tgoing,
                                                  lo_count - c_lo, hi_count - c_lo)
        tv = tl.where(searching, value, tv)
    return tv, tt, n > hi_count


@triton.jit
def _compact_joint(keys, sets, lines, cols, tvq, ttq, NQ: tl.constexpr, CAP: tl.constexpr,
                   CHUNK: tl.constexpr):
    """One pass storing the int64 keys of every queue's selected members into its ``[CAP]``
    line (positions from one int64 scan of 16-bit per-queue fields, as in :mod:`.refine_select`)."""
    none = tl.full([1], 0, tl.int32)
    carry = tl.sum(line_field(none, none > 0, CAP), axis=0)     # 0, of the fields' type
    for c0 in range(0, cols, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        v, qid = _line(keys, sets, idx, idx < cols)
        tie = tl.where(qid == 0, -idx, idx)
        tv = pick(qid, tvq, NQ)
        sel = (qid >= 0) & ((v < tv) | ((v == tv) & (tie <= pick(qid, ttq, NQ))))
        field = line_field(qid, sel, CAP)
        pos = line_count(carry + tl.cumsum(field, axis=0), qid, CAP)
        tl.store(lines + (qid & 3) * CAP + pos - 1, queue_key(v, tie), mask=sel)
        carry += tl.sum(field, axis=0)


@triton.jit
def select_stream_kernel(
    w_ptr, s_ptr, sq_ptr, vp_ptr, scale_ptr, iscore_ptr, imask_ptr,       # inputs
    mask_ptr, e0_ptr, queue_ptr, qd_ptr, qa_ptr,                           # outputs
    key_ptr, set_ptr, scratch_ptr,                                         # per-program scratch
    rows, cols, stride_w, stride_is, stride_im, stride_m, pruned_per_row, depth,
    IS_NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MPAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr,
    NQ: tl.constexpr, TPAD: tl.constexpr, CAP: tl.constexpr, STORE_A: tl.constexpr,
    CHUNK: tl.constexpr, MASK_CHUNK: tl.constexpr, JOINT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    keys = key_ptr + pid.to(tl.int64) * cols
    sets = set_ptr + pid.to(tl.int64) * cols
    lines = scratch_ptr + pid.to(tl.int64) * (NQ * CAP)
    # the key pass walks [1, CHUNK] tiles; the mask pass [GCH, MPAD] tiles of N:M groups of M
    # columns, or [1, MASK_CHUNK] columns: the launcher makes that 4 columns per thread, as
    # its values and predicates for 8 overflow the predicate registers (benchmarks/PERF_NOTES.md)
    GCH: tl.constexpr = MASK_CHUNK // MPAD if IS_NM else 1
    WIDTH: tl.constexpr = MPAD if IS_NM else MASK_CHUNK
    STEP: tl.constexpr = GCH * M if IS_NM else MASK_CHUNK
    # unstructured weight loads are hinted to at most 4-column vectors: an fp16/bf16 load then
    # takes the layout of the int32 key store of the same tile (4 per thread), and the key and
    # mask passes need no layout conversion through shared memory (2 barriers per chunk each)
    VEC: tl.constexpr = 4 if MASK_CHUNK >= 4 else MASK_CHUNK
    KVEC: tl.constexpr = 4 if CHUNK >= 4 else CHUNK
    gi = tl.arange(0, GCH)[:, None]
    jj = tl.arange(0, WIDTH)[None, :]
    kj = tl.arange(0, CHUNK)[None, :]
    qq = tl.arange(0, NQ)[:, None]
    slot = tl.arange(0, CAP)[None, :]
    # the previous row's k-th score over its mean score, and how far off the last prediction
    # was (ordered key units): this program's seed for the next row's k-th search
    ratio, miss, have_ratio = seed_state()
    # the same for the joint queue search: each queue's previous threshold key, the last miss,
    # and whether the queue has one yet
    q_seed, q_miss, q_have = queue_seed_state(NQ)
    for row in range(pid, rows, nprog):
        row64 = (pid * 0 + row).to(tl.int64)     # (a tensor also under the interpreter)
        w_row = w_ptr + row64 * stride_w
        iscore_row = iscore_ptr + row64 * stride_is
        tl.debug_barrier()                      # the previous row's readers of the scratch are done

        # ---- SPEC §2, unstructured: the k-th smallest init-score key ---------------------
        tv = INT32_MAX
        tt = INT32_MAX
        if not IS_NM:
            if not HAS_MASK:
                score_sum = tl.zeros([1, CHUNK], dtype=tl.float32)
                for c0 in range(0, cols, CHUNK):
                    idx = c0 + kj                             # [1, CHUNK]
                    valid = idx < cols
                    score = init_score(w_row, scale_ptr, iscore_row, tl.max_contiguous(idx, [1, KVEC]), valid,
                                       HAS_SCORE)
                    score_sum += tl.where(valid, score, 0.0)
                    tl.store(keys + idx, init_key(score, HAS_SCORE), mask=valid)
                tl.debug_barrier()
                mean_score = tl.sum(tl.sum(score_sum, axis=1), axis=0) / cols
                seed, spread = seed_predict(mean_score, ratio, miss)
                # (k = 0 prunes nothing: the mask pass ignores the threshold of its k = 1 search)
                tv, tt = _kth_search(keys, cols, pruned_per_row + (pruned_per_row == 0), seed, spread,
                                     have_ratio != 0, CHUNK)
                # the seed of the next row (a prediction is only a probe: any value is exact)
                ratio, miss, have_ratio = seed_learn(tv, seed, mean_score, ratio, miss, have_ratio)
                tl.debug_barrier()

        # ---- the mask, e0, and each weight's queue id and key ------------------------------
        # e0 is summed per thread and reduced once after the pass: a block reduction per
        # chunk would put its barriers inside the loop
        e0_acc = tl.zeros([GCH, WIDTH], dtype=tl.float64)
        for c0 in range(0, cols, STEP):
            if IS_NM:
                col = c0 + gi * M + jj
                valid = (jj < M) & (col < cols)
            else:
                col = c0 + gi * 0 + jj
                valid = col < cols
            if HAS_MASK:
                pruned = valid & (tl.load(imask_ptr + row64 * stride_im + col, mask=valid, other=0) != 0)
            elif IS_NM:
                sv = init_key(init_score(w_row, scale_ptr, iscore_row, col, valid, HAS_SCORE), HAS_SCORE)
                rank = tl.zeros([GCH, WIDTH], dtype=tl.int32)
                for j2 in tl.static_range(M):
                    c2 = c0 + gi * M + j2                     # [GCH, 1]: member j2 of each group
                    s2 = init_score(w_row, scale_ptr, iscore_row, c2, c2 < cols, HAS_SCORE)
                    k2 = init_key(s2, HAS_SCORE)
                    rank += tl.where((k2 < sv) | ((k2 == sv) & (c2 < col)), 1, 0)
                pruned = valid & (rank < N)
            else:
                sv = tl.load(keys + col, mask=valid, other=INT32_MAX)
                pruned = valid & ((sv < tv) | ((sv == tv) & (col <= tt))) & (pruned_per_row > 0)
            tl.store(mask_ptr + row64 * stride_m + col, pruned.to(tl.int8), mask=valid)
            wcol = col
            if not IS_NM:
                wcol = tl.max_contiguous(col, [1, VEC])
            w = tl.load(w_row + wcol, mask=valid, other=0.0).to(tl.float32)
            d = w * tl.load(s_ptr + col, mask=valid, other=0.0)
            g = tl.math.div_rn(d, tl.load(vp_ptr + col, mask=valid, other=1.0))
            e0_acc += tl.where(pruned, d.to(tl.float64), 0.0)
            a = d
            if NQ == 4:
                a = tl.abs(w) * tl.load(sq_ptr + col, mask=valid, other=0.0)
            qid, v = queue_id_key(pruned, valid & (pruned == 0), d, g, a, NQ)
            tl.store(keys + col, v, mask=valid)
            tl.store(sets + col, qid.to(tl.int8), mask=valid)
        tl.store(e0_ptr + row64, tl.sum(tl.sum(e0_acc, axis=1), axis=0))
        tl.store(lines + qq * CAP + slot, tl.full([NQ, CAP], INT64_MAX, tl.int64))
        tl.debug_barrier()

        # ---- SPEC §4/§5: per queue, a threshold keeping depth..CAP members, then compaction -
        if JOINT:
            tvq, ttq, searched = _joint_search(keys, sets, cols, depth, CAP, q_seed,
                                               tl.maximum(2 * q_miss, 4096), q_have != 0, NQ, CHUNK)
            # the next row's seeds: this row's thresholds (queues that needed a search)
            q_seed, q_miss, q_have = queue_seed_learn(tvq, searched, q_seed, q_miss, q_have)
            _compact_joint(keys, sets, lines, cols, tvq, ttq, NQ, CAP, CHUNK)
        else:
            for q in tl.static_range(NQ):
                qv, qt = _search(keys, sets, cols, q, depth, CAP, q == 0, True, CHUNK)
                _compact(keys, sets, lines + q * CAP, cols, q, INT64_MIN, qv, qt, q == 0, True, CHUNK)
        tl.debug_barrier()                     # the compacted keys are visible to every thread
        head = tl.sort(tl.load(lines + qq * CAP + slot), dim=1)
        store_queues(head, row64, w_row, s_ptr, sq_ptr, queue_ptr, qd_ptr, qa_ptr, NQ, TPAD, STORE_A)

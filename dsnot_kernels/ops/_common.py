"""Shared ``@triton.jit`` helpers of the DSnoT kernels: exact keys, selection, signs.

Every ordering in SPEC §2/§4/§5 is "by a float32 score, ties by column". Both are packed into
one int64 *key* per weight, ``ordered(score) * 2**32 + column``, where ``ordered`` maps float32
bits to an int32 whose signed order equals the float order (negative floats get their magnitude
bits flipped). Keys are unique within a row, so "the t smallest" is well defined and a
selection by counting reproduces a stable sort exactly. The selections themselves
(:func:`threshold32` on a row held in registers, ``refine_select_stream._search`` on a
streamed key line; both built from :func:`search_start` / :func:`search_probe` /
:func:`search_step` / :func:`tie_step`) search on the int32 value (``ordered32``) alone and look at the column
only inside a tie block, so the per-weight work is int32.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT64_MAX = tl.constexpr(9223372036854775807)
INT64_MIN = tl.constexpr(-9223372036854775808)
INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def ordered_key(x, col):
    """int64 key ordering like ``(x, col)`` for float32 ``x`` and int64 ``col`` (same shape)."""
    x = tl.where(x == 0.0, 0.0, x)                 # -0.0 and +0.0 compare equal in torch's sort
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(tl.int64) * 4294967296 + col


@triton.jit
def ordered32(x):
    """int32 whose signed order equals the float order of float32 ``x`` (-0.0 reads as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_le(v, member, t):
    return tl.sum(tl.where(member & (v <= t), 1, 0))


@triton.jit
def _count_min_max(n_a, lo_a, hi_a, n_b, lo_b, hi_b):
    return n_a + n_b, tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def count_min_max(n, lo, hi):
    """``(sum(n), min(lo), max(hi))`` of 1-D blocks in one multi-operand block reduction."""
    return tl.reduce((n, lo, hi), 0, _count_min_max)


@triton.jit
def search_start(n, vmin, vmax, lo_count, hi_count):
    """Initial state of a threshold search over ``n`` members with keys in ``[vmin, vmax]``:
    ``(lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect)`` with
    ``count(<= lo) == c_lo == 0`` and ``count(<= hi) == c_hi == n``."""
    lo_count = n * 0 + lo_count          # tensors even when the launcher specialised them to 1
    hi_count = n * 0 + hi_count
    tv = (n * 0 + INT32_MAX).to(tl.int32)
    target = (lo_count + hi_count).to(tl.float64) * 0.5 + 0.5
    return (lo_count, hi_count, vmin.to(tl.int64) - 1, vmax.to(tl.int64), n * 0, n, tv, tv,
            n > hi_count, target, n < 0)


@triton.jit
def search_probe(lo, hi, c_lo, c_hi, target, bisect):
    """The next key to count: where linear interpolation of the counts reaches ``target``, or
    the midpoint after a probe that did not halve the interval; always inside ``(lo, hi)``."""
    span = hi - lo
    # (a finished or empty queue of the joint search has c_hi == c_lo: keep its probe finite)
    frac = (target - c_lo.to(tl.float64)) / tl.maximum(c_hi - c_lo, 1).to(tl.float64)
    guess = lo + (span.to(tl.float64) * frac).to(tl.int64)
    mid = tl.where(bisect, lo + span // 2, guess)
    return tl.minimum(tl.maximum(mid, lo + 1), hi - 1)


@triton.jit
def search_probes3(lo, hi, c_lo, c_hi, target, bisect):
    """Three keys to count in one pass (``(t1, t2, t3)``, ascending): :func:`search_probe`'s
    interpolated guess and one member's width of keys either side of it, or the bracket's
    quartiles after a pass that did not halve it; each inside ``(lo, hi)``. The streamed
    kernel's seeded ``k``-th search takes ~40% fewer passes with them than with one key per
    pass (counted under the interpreter, benchmarks/PERF_NOTES.md)."""
    span = hi - lo
    members = tl.maximum(c_hi - c_lo, 1).to(tl.float64)
    width = span.to(tl.float64) / members                     # keys per member in the bracket
    guess = lo.to(tl.float64) + width * (target - c_lo.to(tl.float64))
    t1 = tl.where(bisect, lo + span // 4, (guess - width).to(tl.int64))
    t2 = tl.where(bisect, lo + span // 2, guess.to(tl.int64))
    t3 = tl.where(bisect, hi - span // 4, (guess + width).to(tl.int64))
    return (tl.minimum(tl.maximum(t1, lo + 1), hi - 1), tl.minimum(tl.maximum(t2, lo + 1), hi - 1),
            tl.minimum(tl.maximum(t3, lo + 1), hi - 1))


@triton.jit
def search_step(c, mid, lo, hi, c_lo, c_hi, tv, searching, lo_count, hi_count):
    """Narrow the bracket with ``c = count(<= mid)``; returns
    ``(lo, hi, c_lo, c_hi, tv, searching, bisect)`` (``tv = mid`` once ``c`` is in range)."""
    span = hi - lo
    found = (c >= lo_count) & (c <= hi_count)
    tv = tl.where(found, mid.to(tl.int32), tv)
    searching = searching & (found == 0)
    go_up = c < lo_count
    lo = tl.where(go_up & searching, mid, lo)
    c_lo = tl.where(go_up & searching, c, c_lo)
    hi = tl.where((go_up == 0) & searching, mid, hi)
    c_hi = tl.where((go_up == 0) & searching, c, c_hi)
    return lo, hi, c_lo, c_hi, tv, searching, 2 * (hi - lo) > span


@triton.jit
def tie_step(c, mid, tlo, thi, tt, need_lo, need_hi):
    """One bisection step on the tie key inside a tie block; returns ``(tlo, thi, tt, going)``."""
    found = (c >= need_lo) & (c <= need_hi)
    tt = tl.where(found, mid.to(tl.int32), tt)
    tlo = tl.where(c < need_lo, mid, tlo)
    thi = tl.where(c > need_hi, mid, thi)
    return tlo, thi, tt, (found == 0) & (thi - tlo > 1)


@triton.jit
def threshold32(v, tie, member, lo_count, hi_count):
    """``(tv, tt)`` such that ``sel = member & ((v < tv) | ((v == tv) & (tie <= tt)))`` has
    ``lo_count <= #sel <= hi_count`` (1-D int32 ``v``, ``tie``; ``1 <= lo_count <= hi_count``).

    ``(v, tie)`` pairs are unique among members, so "the ``c`` smallest pairs" is a stable
    sort's prefix. All members qualify when they number at most ``hi_count`` (``tv = INT32_MAX``,
    ``tt = INT32_MAX``). Otherwise a search on the int32 value ``v`` keeps
    ``count(v <= lo) < lo_count < hi_count < count(v <= hi)`` and probes a ``mid`` by linear
    interpolation of the counts (falling back to bisection after a step that did not halve
    the interval), stopping as soon as a count lands in range: a handful of counting passes
    for smooth rows, at most ~64. If the interval closes on a tie block (``hi = lo + 1``) the
    members with ``v == hi`` are split by a bisection on ``tie``. Cost: one int32 compare and
    one block reduction per probe; no memory traffic.
    """
    n, vmin, vmax = count_min_max(tl.where(member, 1, 0), tl.where(member, v, INT32_MAX),
                                  tl.where(member, v, INT32_MIN))
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = search_start(
        n, vmin, vmax, lo_count, hi_count)
    return _search_registers(v, tie, member, lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt,
                             searching, target, bisect)


@triton.jit
def kth32_seeded(v, tie, member, k, seed, spread, use_seed):
    """:func:`threshold32` ``(v, tie, member, k, k)`` (the ``k``-th smallest pair, ``k >= 1``)
    whose first reduction also counts the members at ``seed -+ spread``, two probes that usually
    bracket the answer before the first search probe (see :func:`seed_predict`). Any seed gives
    the same answer: a seed count is used only when ``use_seed`` and it lies inside the bracket."""
    t_lo, t_hi = seed_probes(seed, spread)
    n, vmin, vmax, c1, c2 = tl.reduce((tl.where(member, 1, 0), tl.where(member, v, INT32_MAX),
                                       tl.where(member, v, INT32_MIN), tl.where(member & (v <= t_lo), 1, 0),
                                       tl.where(member & (v <= t_hi), 1, 0)), 0, combine5)
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = seeded_search_start(
        n, vmin, vmax, c1, c2, t_lo, t_hi, k, k, use_seed)
    return _search_registers(v, tie, member, lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt,
                             searching, target, bisect)


@triton.jit
def seed_probes(seed, spread):
    """The two int32 keys a seeded search counts in its first pass: ``seed -+ spread``, clamped."""
    t_lo = tl.maximum(tl.minimum(seed - spread, INT32_MAX), INT32_MIN).to(tl.int32)
    t_hi = tl.maximum(tl.minimum(seed + spread, INT32_MAX), INT32_MIN).to(tl.int32)
    return t_lo, t_hi


@triton.jit
def seeded_search_start(n, vmin, vmax, c1, c2, t_lo, t_hi, lo_count, hi_count, use_seed):
    """:func:`search_start` (scalars, or ``[NQ]`` for the joint queue search), then narrowed by
    the seed counts ``c1``, ``c2`` (members ``<= t_lo``, ``<= t_hi``) where they apply
    (:func:`seed_step`)."""
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = search_start(
        n, vmin, vmax, lo_count, hi_count)
    lo, hi, c_lo, c_hi, tv, searching = seed_step(c1, t_lo, use_seed, lo, hi, c_lo, c_hi, tv, searching,
                                                  lo_count, hi_count)
    lo, hi, c_lo, c_hi, tv, searching = seed_step(c2, t_hi, use_seed, lo, hi, c_lo, c_hi, tv, searching,
                                                  lo_count, hi_count)
    return lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect


@triton.jit
def _search_registers(v, tie, member, lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching,
                      target, bisect):
    """The probes and the tie split of :func:`threshold32` from a search state."""
    steps = 0
    while searching & (hi - lo > 1) & (steps < 70):
        mid = search_probe(lo, hi, c_lo, c_hi, target, bisect)
        c = _count_le(v, member, mid.to(tl.int32))
        lo, hi, c_lo, c_hi, tv, searching, bisect = search_step(c, mid, lo, hi, c_lo, c_hi, tv,
                                                                searching, lo_count, hi_count)
        steps += 1
    if searching:
        # tie block at value hi straddles the range: take its members with the smallest tie
        tmember = member & (v == hi.to(tl.int32))
        tlo = tl.min(tl.where(tmember, tie, INT32_MAX)).to(tl.int64) - 1
        thi = tl.max(tl.where(tmember, tie, INT32_MIN)).to(tl.int64)
        tt = thi.to(tl.int32)
        going = thi - tlo > 1
        while going:
            mid = tlo + (thi - tlo) // 2
            c = _count_le(tie, tmember, mid.to(tl.int32))
            tlo, thi, tt, going = tie_step(c, mid, tlo, thi, tt, lo_count - c_lo, hi_count - c_lo)
        tv = hi.to(tl.int32)
    return tv, tt


@triton.jit
def combine5(n_a, lo_a, hi_a, s1_a, s2_a, n_b, lo_b, hi_b, s1_b, s2_b):
    """Combine of a (count, min, max, seed count, seed count) multi-operand reduction."""
    return n_a + n_b, tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b), s1_a + s1_b, s2_a + s2_b


@triton.jit
def seed_step(c, t, use, lo, hi, c_lo, c_hi, tv, searching, lo_count, hi_count):
    """:func:`search_step` with a seed key ``t`` counted in the stats pass, applied only when
    ``use`` and ``t`` lies strictly inside the bracket (else the state is unchanged)."""
    inside = use & searching & (t > lo) & (t < hi)
    lo2, hi2, c_lo2, c_hi2, tv2, searching2, _ = search_step(c, t, lo, hi, c_lo, c_hi, tv, searching,
                                                             lo_count, hi_count)
    return (tl.where(inside, lo2, lo), tl.where(inside, hi2, hi), tl.where(inside, c_lo2, c_lo),
            tl.where(inside, c_hi2, c_hi), tl.where(inside, tv2, tv), tl.where(inside, searching2, searching))


@triton.jit
def seed_state():
    """Initial ``(ratio, miss, have_ratio)`` of a program's k-th-score predictor (scalars)."""
    return (tl.zeros([1], dtype=tl.float32).sum(axis=0), tl.full([1], 65536, dtype=tl.int64).sum(axis=0),
            tl.zeros([1], dtype=tl.int32).sum(axis=0))


@triton.jit
def seed_predict(mean_score, ratio, miss):
    """``(seed, spread)``: this row's predicted ``k``-th key (the previous row's ``k``-th score
    over its mean score, times this row's mean score) and how far to probe around it (twice
    the last miss, in ordered-key units)."""
    return ordered32(mean_score * ratio).to(tl.int64), tl.maximum(2 * miss, 4096)


@triton.jit
def seed_learn(tv, seed, mean_score, ratio, miss, have_ratio):
    """The predictor after a row whose ``k``-th key came out ``tv``: ``(ratio, miss, have_ratio)``
    (rows with a zero, NaN or infinite mean score leave the ratio as it was)."""
    kth = tl.where(tv < 0, tv ^ 0x7FFFFFFF, tv).to(tl.float32, bitcast=True)
    miss = tl.where(have_ratio != 0, tl.abs(tv.to(tl.int64) - seed), miss)
    usable = (mean_score > 0) & (kth == kth) & (mean_score < float("inf"))
    # divide by 1 where the ratio is not used: no 0/0 or x/inf is ever computed
    ratio_new = kth / tl.where(usable, mean_score, 1.0)
    return tl.where(usable, ratio_new, ratio), miss, tl.where(usable, 1, have_ratio)


@triton.jit
def init_score(w_row, scale_ptr, iscore_row, col, valid, HAS_SCORE: tl.constexpr):
    """The init method's float32 score at ``col`` of one row (SPEC §2): the given score row
    (SparseGPT), else ``|w| * init_col_scale``; ``w_row``/``iscore_row`` point at the row."""
    if HAS_SCORE:
        return tl.load(iscore_row + col, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_row + col, mask=valid, other=0.0).to(tl.float32)
    return tl.abs(w) * tl.load(scale_ptr + col, mask=valid, other=0.0)


@triton.jit
def init_key(score, HAS_SCORE: tl.constexpr):
    """``ordered32`` of an :func:`init_score`. Without a given score the score is ``|w| *
    scale`` with ``scale >= +0.0`` (the host turns a ``sqrt(Q)`` of -0.0 into +0.0), so it is
    never negative nor -0.0 and its float bits already order like it: no fix-ups per weight."""
    if HAS_SCORE:
        return ordered32(score)
    return score.to(tl.int32, bitcast=True)


@triton.jit
def queue_id_key(pruned, kept, d, g, a, NQ: tl.constexpr):
    """Each weight's candidate queue (SPEC §4; -1 = none) and its int32 key, ascending = pop
    order: q0 grow+ (pruned, G > 0) ``~ord(G)``, q1 grow- (pruned, G < 0) ``ord(G)``, and with
    ``NQ == 4`` q2 prune- (kept, D < 0) and q3 prune+ (kept, D > 0) ``ord(A)``.

    The key of a weight in no queue is never read, which keeps this cheaper than ``ordered32``
    per term: a G > 0 orders like its bits (``~`` reverses them), a G < 0 like its bits with the
    magnitude flipped (``^ 0x7FFFFFFF``), and ``A = |w| * sqrt(Q) >= +0.0`` like its bits."""
    g_key = g.to(tl.int32, bitcast=True) ^ tl.where(g > 0, -1, 0x7FFFFFFF)
    qid = tl.where(pruned & (g > 0), 0, tl.where(pruned & (g < 0), 1, -1))
    if NQ == 4:
        qid = tl.where(kept & (d < 0), 2, tl.where(kept & (d > 0), 3, qid))
        return qid, tl.where(pruned, g_key, a.to(tl.int32, bitcast=True))
    return qid, g_key


@triton.jit
def queue_key(v, tie):
    """int64 key ``v * 2^32 + tie + 2^31`` of a queue member: ascending key = pop order (the
    tie is -col for grow+, col otherwise); :func:`store_queues` decodes it."""
    return v.to(tl.int64) * 4294967296 + (tie.to(tl.int64) + 2147483648)


@triton.jit
def store_queues(head, row, w_row, s_ptr, sq_ptr, queue_ptr, qd_ptr, qa_ptr,
                 NQ: tl.constexpr, TPAD: tl.constexpr, STORE_A: tl.constexpr):
    """Write the first ``TPAD`` entries of each queue from its sorted keys ``head`` ``[NQ, CAP]``
    (``INT64_MAX`` = no entry; key = ``v * 2^32 + tie + 2^31``, tie = -col for queue 0): the
    column (``-1`` past the end), its ``D`` and, with ``STORE_A``, its ``A``, so that the cycles
    kernel needs no gathers from ``W`` for unstructured rows."""
    qq = tl.arange(0, NQ)[:, None]
    slot = tl.arange(0, head.shape[1])[None, :]
    live = head != INT64_MAX
    hcol = ((head & 0xFFFFFFFF) - 2147483648).to(tl.int32)
    hcol = tl.where(qq == 0, -hcol, hcol)
    keep = live & (slot < TPAD)
    out = (row * NQ + qq) * TPAD + slot
    tl.store(queue_ptr + out, tl.where(live, hcol, -1), mask=slot < TPAD)
    hc = tl.where(keep, hcol, 0)
    wq = tl.load(w_row + hc, mask=keep, other=0.0).to(tl.float32)
    tl.store(qd_ptr + out, wq * tl.load(s_ptr + hc, mask=keep, other=0.0), mask=slot < TPAD)
    if STORE_A:
        tl.store(qa_ptr + out, tl.abs(wq) * tl.load(sq_ptr + hc, mask=keep, other=0.0),
                 mask=slot < TPAD)


@triton.jit
def sign_f64(x):
    """``sign(x)`` as int32 (-1, 0, 1)."""
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)


# ---- joint queue search: the NQ (2 or 4) queue thresholds found in lockstep ----------------
# The queues are disjoint, so each weight carries one queue id ``qid`` (-1 = in no queue) and
# one count field ``1 << 16*qid``: a single int64 sum counts all queues at once (16-bit
# fields: the launcher uses the joint search only for rows of < 65536 columns). Each probe
# of the search is then ONE block reduction for all queues instead of one per queue, and the
# searches take as many probes as the slowest queue instead of the sum over queues.

@triton.jit
def queue_field(qid):
    """int64 count field of each weight's queue (0 for ``qid < 0``)."""
    # qid & 3 keeps the shift in 0..48 (NQ <= 4): a shift by -16 (qid = -1) would be poison
    # in LLVM even where the select discards it
    shift = (qid & 3).to(tl.int64) * 16
    return tl.where(qid >= 0, tl.full(qid.shape, 1, tl.int64) << shift, 0)


@triton.jit
def line_field(qid, sel, CAP: tl.constexpr):
    """Scan operand of the compaction into the ``[CAP]`` queue lines: a 1 in the count field
    of queue ``qid`` where ``sel``, else 0. A field counts selected members, at most ``CAP``:
    with ``CAP <= 128`` (the default) four 8-bit fields fit a uint32, which halves the scan's
    shuffles and registers; longer lines use 16-bit fields of an int64 (:func:`queue_field`)."""
    if CAP <= 128:
        one = tl.full(qid.shape, 1, tl.uint32)
        return tl.where(sel, one << ((qid & 3).to(tl.uint32) * 8), tl.zeros(qid.shape, tl.uint32))
    else:
        return tl.where(sel, queue_field(qid), 0)


@triton.jit
def line_count(packed, qid, CAP: tl.constexpr):
    """Queue ``qid``'s int32 count in a sum or scan of :func:`line_field` operands."""
    if CAP <= 128:
        return ((packed >> ((qid & 3).to(tl.uint32) * 8)) & 0xFF).to(tl.int32)
    else:
        return ((packed >> ((qid & 3).to(tl.int64) * 16)) & 0xFFFF).to(tl.int32)


@triton.jit
def unpack_counts(packed, NQ: tl.constexpr):
    """``[NQ]`` int64 counts from an int64 holding one 16-bit count per queue."""
    return (packed >> (tl.arange(0, NQ).to(tl.int64) * 16)) & 0xFFFF


@triton.jit
def pick(qid, x, NQ: tl.constexpr):
    """``x[qid]`` for every weight (``x`` is ``[NQ]``; weights in no queue read ``x[NQ-1]``)."""
    qq = tl.arange(0, NQ)
    out = tl.zeros(qid.shape, x.dtype) + tl.sum(tl.where(qq == NQ - 1, x, 0), axis=0)
    for q in tl.static_range(NQ - 1):
        out = tl.where(qid == q, tl.sum(tl.where(qq == q, x, 0), axis=0), out)
    return out


@triton.jit
def _stats_combine(n_a, lo0_a, hi0_a, lo1_a, hi1_a, lo2_a, hi2_a, lo3_a, hi3_a,
                   n_b, lo0_b, hi0_b, lo1_b, hi1_b, lo2_b, hi2_b, lo3_b, hi3_b):
    return (n_a + n_b, tl.minimum(lo0_a, lo0_b), tl.maximum(hi0_a, hi0_b),
            tl.minimum(lo1_a, lo1_b), tl.maximum(hi1_a, hi1_b),
            tl.minimum(lo2_a, lo2_b), tl.maximum(hi2_a, hi2_b),
            tl.minimum(lo3_a, lo3_b), tl.maximum(hi3_a, hi3_b))


@triton.jit
def queue_stats_parts(v, qid, NQ: tl.constexpr):
    """Per-weight operands of the joint member count and per-queue min/max (see
    :func:`queue_stats_reduce`): ``(field, lo0, hi0, .., lo3, hi3)`` (constants past ``NQ``)."""
    none_lo = tl.full(v.shape, INT32_MAX, tl.int32)
    none_hi = tl.full(v.shape, INT32_MIN, tl.int32)
    lo2, hi2, lo3, hi3 = none_lo, none_hi, none_lo, none_hi
    if NQ == 4:
        lo2, hi2 = tl.where(qid == 2, v, INT32_MAX), tl.where(qid == 2, v, INT32_MIN)
        lo3, hi3 = tl.where(qid == 3, v, INT32_MAX), tl.where(qid == 3, v, INT32_MIN)
    return (queue_field(qid),
            tl.where(qid == 0, v, INT32_MAX), tl.where(qid == 0, v, INT32_MIN),
            tl.where(qid == 1, v, INT32_MAX), tl.where(qid == 1, v, INT32_MIN),
            lo2, hi2, lo3, hi3)


@triton.jit
def queue_stats_merge(acc, parts):
    """Elementwise merge of two :func:`queue_stats_parts` tuples (streamed accumulation)."""
    return _stats_combine(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7], acc[8],
                          parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6],
                          parts[7], parts[8])


@triton.jit
def queue_stats_reduce(parts, NQ: tl.constexpr):
    """``(n, vmin, vmax)``, each ``[NQ]``, from per-weight :func:`queue_stats_parts` (one
    multi-operand block reduction)."""
    r = tl.reduce(parts, 0, _stats_combine)
    qq = tl.arange(0, NQ)
    vmin = tl.where(qq == 0, r[1], tl.where(qq == 1, r[3], tl.where(qq == 2, r[5], r[7])))
    vmax = tl.where(qq == 0, r[2], tl.where(qq == 1, r[4], tl.where(qq == 2, r[6], r[8])))
    return unpack_counts(r[0], NQ), vmin, vmax


@triton.jit
def joint_step(c, mid, lo, hi, c_lo, c_hi, tv, searching, bisect, going, lo_count, hi_count):
    """:func:`search_step` for the queues still ``going`` (``[NQ]`` state); the others keep
    theirs. Returns ``(lo, hi, c_lo, c_hi, tv, searching, bisect, going)``."""
    lo2, hi2, c_lo2, c_hi2, tv2, searching2, bisect2 = search_step(
        c, mid, lo, hi, c_lo, c_hi, tv, searching, lo_count, hi_count)
    lo = tl.where(going, lo2, lo)
    hi = tl.where(going, hi2, hi)
    c_lo = tl.where(going, c_lo2, c_lo)
    c_hi = tl.where(going, c_hi2, c_hi)
    tv = tl.where(going, tv2, tv)
    searching = tl.where(going, searching2, searching)
    bisect = tl.where(going, bisect2, bisect)
    return lo, hi, c_lo, c_hi, tv, searching, bisect, searching & (hi - lo > 1)


@triton.jit
def tie_start(lo, tt, searching, cols):
    """Tie-split state ``(tlo, thi, tt, going)`` for the searches (a scalar or ``[NQ]``) still
    ``searching`` after the value search (ties are +-col, within ``(-cols-1, cols]``)."""
    tlo = lo * 0 - cols - 1
    thi = lo * 0 + cols
    return tlo, thi, tl.where(searching, thi.to(tl.int32), tt), searching & (thi - tlo > 1)


@triton.jit
def joint_tie_step(c, mid, tlo, thi, tt, going, need_lo, need_hi):
    """:func:`tie_step` for the queues still ``going``; returns ``(tlo, thi, tt, going)``."""
    tlo2, thi2, tt2, going2 = tie_step(c, mid, tlo, thi, tt, need_lo, need_hi)
    return (tl.where(going, tlo2, tlo), tl.where(going, thi2, thi), tl.where(going, tt2, tt),
            going & going2)


@triton.jit
def any_true(flags):
    """Scalar: is any of the ``[NQ]`` flags set?"""
    return tl.max(flags.to(tl.int32), axis=0) > 0


@triton.jit
def queue_thresholds(v, tie, qid, lo_count, hi_count, cols, seed, spread, use_seed,
                     NQ: tl.constexpr, SEEDED: tl.constexpr):
    """Per-queue ``(tv, tt, searched)`` (each ``[NQ]``) for a row held in registers: the
    :func:`threshold32` contract for every queue ``q`` (members: ``qid == q``), all searches
    run in lockstep with one block reduction per probe for all queues; ``searched``: the
    queue had more than ``hi_count`` members (``tv`` is then the next row's seed).

    ``SEEDED``: one more reduction first counts every queue at its ``seed -+ spread``
    (``[NQ]``, used where ``use_seed``: the program's previous row's thresholds), which
    usually ends the search; a seed is only a probe, any seed gives the same thresholds."""
    field = queue_field(qid)
    n, vmin, vmax = queue_stats_reduce(queue_stats_parts(v, qid, NQ), NQ)
    if SEEDED:
        t_lo, t_hi = seed_probes(seed, spread)
        at_lo, at_hi = tl.reduce((tl.where(v <= pick(qid, t_lo, NQ), field, 0),
                                  tl.where(v <= pick(qid, t_hi, NQ), field, 0)), 0, _add2)
        lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = seeded_search_start(
            n, vmin, vmax, unpack_counts(at_lo, NQ), unpack_counts(at_hi, NQ), t_lo, t_hi,
            lo_count, hi_count, use_seed)
    else:
        lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = search_start(
            n, vmin, vmax, lo_count, hi_count)
    going = searching & (hi - lo > 1)
    steps = 0
    while any_true(going) & (steps < 70):
        mid = search_probe(lo, hi, c_lo, c_hi, target, bisect)
        c = unpack_counts(tl.sum(tl.where(v <= pick(qid, mid.to(tl.int32), NQ), field, 0), axis=0), NQ)
        lo, hi, c_lo, c_hi, tv, searching, bisect, going = joint_step(
            c, mid, lo, hi, c_lo, c_hi, tv, searching, bisect, going, lo_count, hi_count)
        steps += 1
    if any_true(searching):
        # tie blocks at key hi straddle the wanted counts: split them by the tie key
        value = hi.to(tl.int32)
        tfield = tl.where(v == pick(qid, value, NQ), field, 0)
        tlo, thi, tt, tgoing = tie_start(lo, tt, searching, cols)
        while any_true(tgoing):
            mid = tlo + (thi - tlo) // 2
            c = unpack_counts(tl.sum(tl.where(tie <= pick(qid, mid.to(tl.int32), NQ), tfield, 0),
                                     axis=0), NQ)
            tlo, thi, tt, tgoing = joint_tie_step(c, mid, tlo, thi, tt, tgoing,
                                                  lo_count - c_lo, hi_count - c_lo)
        tv = tl.where(searching, value, tv)
    return tv, tt, n > hi_count


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def queue_seed_state(NQ: tl.constexpr):
    """Initial ``(seed, miss, have)`` (each ``[NQ]``) of a program's queue-threshold predictor:
    each queue's previous threshold key, how far off the last seed was, whether it has one."""
    return (tl.zeros([NQ], dtype=tl.int64), tl.full([NQ], 65536, dtype=tl.int64),
            tl.zeros([NQ], dtype=tl.int32))


@triton.jit
def queue_seed_learn(tv, searched, seed, miss, have):
    """The predictor after a row whose queue thresholds came out ``tv`` (queues that were
    ``searched``); returns ``(seed, miss, have)``."""
    miss = tl.where(searched & (have != 0), tl.abs(tv.to(tl.int64) - seed), miss)
    return tl.where(searched, tv.to(tl.int64), seed), miss, tl.where(searched, 1, have)

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
    frac = (target - c_lo.to(tl.float64)) / (c_hi - c_lo).to(tl.float64)
    guess = lo + (span.to(tl.float64) * frac).to(tl.int64)
    mid = tl.where(bisect, lo + span // 2, guess)
    return tl.minimum(tl.maximum(mid, lo + 1), hi - 1)


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
    n = tl.sum(tl.where(member, 1, 0))
    lo_count, hi_count, lo, hi, c_lo, c_hi, tv, tt, searching, target, bisect = search_start(
        n, tl.min(tl.where(member, v, INT32_MAX)), tl.max(tl.where(member, v, INT32_MIN)),
        lo_count, hi_count)
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
def init_score(w_row, scale_ptr, iscore_row, col, valid, HAS_SCORE: tl.constexpr):
    """The init method's float32 score at ``col`` of one row (SPEC §2): the given score row
    (SparseGPT), else ``|w| * init_col_scale``; ``w_row``/``iscore_row`` point at the row."""
    if HAS_SCORE:
        return tl.load(iscore_row + col, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_row + col, mask=valid, other=0.0).to(tl.float32)
    return tl.abs(w) * tl.load(scale_ptr + col, mask=valid, other=0.0)


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

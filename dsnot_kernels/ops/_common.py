"""Shared ``@triton.jit`` helpers of the DSnoT kernels: exact keys, selection, signs.

Every ordering in SPEC §2/§4/§5 is "by a float32 score, ties by column". Both are packed into
one int64 *key* per weight, ``ordered(score) * 2**32 + column``, where ``ordered`` maps float32
bits to an int32 whose signed order equals the float order (negative floats get their magnitude
bits flipped). Keys are unique within a row, so "the t smallest" is well defined and a
selection by counting reproduces a stable sort exactly. The selections themselves
(:func:`threshold32`) search on the int32 value (``ordered32``) alone and look at the column
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
    lo_count = n * 0 + lo_count          # tensors even when the launcher specialised them to 1
    hi_count = n * 0 + hi_count
    lo = tl.min(tl.where(member, v, INT32_MAX)).to(tl.int64) - 1     # count(<= lo) == 0
    hi = tl.max(tl.where(member, v, INT32_MIN)).to(tl.int64)         # count(<= hi) == n
    c_lo = n * 0
    c_hi = n
    tv = (n * 0 + INT32_MAX).to(tl.int32)
    tt = (n * 0 + INT32_MAX).to(tl.int32)
    searching = n > hi_count
    target = (lo_count + hi_count).to(tl.float64) * 0.5 + 0.5
    bisect = n < 0                       # False: the first probe interpolates
    steps = 0
    while searching & (hi - lo > 1) & (steps < 70):
        span = hi - lo
        frac = (target - c_lo.to(tl.float64)) / (c_hi - c_lo).to(tl.float64)
        guess = lo + (span.to(tl.float64) * frac).to(tl.int64)
        mid = tl.where(bisect, lo + span // 2, guess)
        mid = tl.minimum(tl.maximum(mid, lo + 1), hi - 1)
        c = _count_le(v, member, mid.to(tl.int32))
        found = (c >= lo_count) & (c <= hi_count)
        tv = tl.where(found, mid.to(tl.int32), tv)
        searching = searching & (found == 0)
        go_up = c < lo_count
        lo = tl.where(go_up & searching, mid, lo)
        c_lo = tl.where(go_up & searching, c, c_lo)
        hi = tl.where((go_up == 0) & searching, mid, hi)
        c_hi = tl.where((go_up == 0) & searching, c, c_hi)
        bisect = 2 * (hi - lo) > span    # the probe did not halve the interval: bisect next
        steps += 1
    if searching:
        # tie block at value hi straddles the range: take its members with the smallest tie
        tmember = member & (v == hi.to(tl.int32))
        need_lo = lo_count - c_lo
        need_hi = hi_count - c_lo
        tlo = tl.min(tl.where(tmember, tie, INT32_MAX)).to(tl.int64) - 1
        thi = tl.max(tl.where(tmember, tie, INT32_MIN)).to(tl.int64)
        tt = thi.to(tl.int32)
        tsearch = thi - tlo > 1
        while tsearch:
            mid = tlo + (thi - tlo) // 2
            c = _count_le(tie, tmember, mid.to(tl.int32))
            found = (c >= need_lo) & (c <= need_hi)
            tt = tl.where(found, mid.to(tl.int32), tt)
            tlo = tl.where(c < need_lo, mid, tlo)
            thi = tl.where(c > need_hi, mid, thi)
            tsearch = (found == 0) & (thi - tlo > 1)
        tv = hi.to(tl.int32)
    return tv, tt


@triton.jit
def sign_f64(x):
    """``sign(x)`` as int32 (-1, 0, 1)."""
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)

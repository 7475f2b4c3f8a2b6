"""Shared ``@triton.jit`` helpers of the DSnoT kernels: exact keys, selection, signs.

Every ordering in SPEC §2/§4/§5 is "by a float32 score, ties by column". Both are packed into
one int64 *key* per weight, ``ordered(score) * 2**32 + column``, where ``ordered`` maps float32
bits to an int32 whose signed order equals the float order (negative floats get their magnitude
bits flipped). Keys are unique within a row, so "the t smallest" is well defined and a
selection by counting (:func:`count_threshold`) reproduces a stable sort exactly.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT64_MAX = tl.constexpr(9223372036854775807)
INT64_MIN = tl.constexpr(-9223372036854775808)


@triton.jit
def ordered_key(x, col):
    """int64 key ordering like ``(x, col)`` for float32 ``x`` and int64 ``col`` (same shape)."""
    x = tl.where(x == 0.0, 0.0, x)                 # -0.0 and +0.0 compare equal in torch's sort
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(tl.int64) * 4294967296 + col


@triton.jit
def key_column(key):
    """The column packed in the low 32 bits of a key (int32)."""
    return (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def count_threshold(tkey, member, lo_count, hi_count):
    """A key ``th`` with ``lo_count <= #{member, tkey <= th} <= hi_count`` (1-D ``tkey``).

    Keys are unique, so such a ``th`` exists whenever ``lo_count <= hi_count``. When the members
    number at most ``hi_count`` the largest member key is returned (all of them qualify);
    otherwise a bisection on the integer key space between the smallest and largest member,
    which stops as soon as the count lands in range (usually after 10-20 counting passes; never
    more than 64). Cost: one pass over ``tkey`` per bisection step, no memory traffic.
    """
    n = tl.sum(tl.where(member, 1, 0))
    lo = tl.min(tl.where(member, tkey, INT64_MAX)) - 1          # count(<= lo) == 0
    hi = tl.max(tl.where(member, tkey, INT64_MIN))              # count(<= hi) == n
    th = tl.where(lo_count == 0, lo, hi)
    searching = (n > hi_count) & (lo_count > 0)
    steps = 0
    while searching & (steps < 66):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)            # floor((lo+hi)/2) without overflow
        c = tl.sum(tl.where(member & (tkey <= mid), 1, 0))
        found = (c >= lo_count) & (c <= hi_count)
        th = tl.where(found, mid, th)
        lo = tl.where(c < lo_count, mid, lo)
        hi = tl.where(c > hi_count, mid, hi)
        searching = searching & (found == 0)
        steps += 1
    return th


@triton.jit
def sign_f64(x):
    """``sign(x)`` as int32 (-1, 0, 1)."""
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)

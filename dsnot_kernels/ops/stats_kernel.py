"""Fused calibration statistics (SPEC §1): one pass over the activations ``x [batch, seq, in]``.

Program ``(n, c)`` owns columns ``c*BLOCK_C ..`` of sample ``n`` and walks its ``seq`` tokens in
tiles of ``BLOCK_T``. Per tile ``b`` (float64 from the fp16/bf16/fp32 load):

    s_b = Σ_t x,   q_b = Σ_t x²,   m_b = s_b / n_b,   M2_b = Σ_t (x - m_b)²      (two-pass in registers)

merged into the sample's running ``(count, mean, M2)`` with Chan's formula

    δ = m_b - mean;  count' = count + n_b;  mean += δ n_b / count';  M2 += M2_b + δ² count n_b / count'

so ``M2`` of the sample is its within-sequence sum of squared deviations without the
cancellation of ``Σx² - (Σx)²/L``. Each program writes its sample's ``(Σx, Σx², M2)`` to a
``[batch, 3, in]`` float64 buffer; the host sums it over the batch (deterministic, no atomics).

Memory traffic: one read of ``x`` (2 or 4 B per element) and ``24 B * batch * in`` written.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

BLOCK_C = 64
BLOCK_T = 32 if os.environ.get("TRITON_INTERPRET") != "1" else 256   # wide tiles in the slow interpreter


@triton.jit
def stats_kernel(x_ptr, out_ptr, seq, width, stride_b, stride_t,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # samples on grid axis 0 (up to 2^31 - 1; axes 1 and 2 stop at 65535), column blocks on axis 1
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cvalid = c < width
    t_in = tl.arange(0, BLOCK_T).to(tl.int64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    total_sq = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, seq, BLOCK_T):
        t = t0 + t_in
        tvalid = (t < seq)[:, None]
        ok = tvalid & cvalid[None, :]
        x = tl.load(x_ptr + n * stride_b + t[:, None] * stride_t + c[None, :], mask=ok, other=0.0)
        x = x.to(tl.float64)
        nb = tl.minimum(seq - t0, BLOCK_T).to(tl.float64)
        sb = tl.sum(x, axis=0)
        mb = sb / nb
        dev = tl.where(ok, x - mb[None, :], 0.0)
        m2b = tl.sum(dev * dev, axis=0)
        total += sb
        total_sq += tl.sum(x * x, axis=0)
        new_count = count + nb
        delta = mb - mean
        mean += delta * (nb / new_count)
        m2 += m2b + delta * delta * (count * nb / new_count)
        count = new_count
    base = out_ptr + n * 3 * width + c
    tl.store(base, total, mask=cvalid)
    tl.store(base + width, total_sq, mask=cvalid)
    tl.store(base + 2 * width, m2, mask=cvalid)


def batch_partial_sums(x: torch.Tensor):
    """``(Σ x, Σ x², Σ_n M2_n)`` over samples and tokens of ``x [batch, seq, in]``, float64 ``[in]`` each.

    Equals :func:`dsnot_kernels.stats._batch_partial_sums_torch` within float64 rounding.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [batch, seq, in], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seq, in], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"x must be a CUDA tensor (or set TRITON_INTERPRET=1), got {x.device}")
    batch, seq, width = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty(batch, 3, width, dtype=torch.float64, device=x.device)
    if batch == 0 or seq == 0 or width == 0:
        z = torch.zeros(width, dtype=torch.float64, device=x.device)
        return z, z.clone(), z.clone()
    col_blocks = -(-width // BLOCK_C)      # (triton.cdiv is a constexpr_function: slow on the host)
    if col_blocks > 65535:
        raise ValueError(f"x has in={width} features; the statistics kernel takes at most {65535 * BLOCK_C}")
    # no FMA contraction: the GPU then rounds each product and sum as the interpreter and
    # the float64 torch path do
    # Triton launches on the current device: make it x's (cuda:1 is not always current)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        stats_kernel[(batch, col_blocks)](
            x, out, seq, width, x.stride(0), x.stride(1), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
            num_warps=4, enable_fp_fusion=False)
    total = out.sum(0)
    return total[0], total[1], total[2]

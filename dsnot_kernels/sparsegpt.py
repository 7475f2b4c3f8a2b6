"""SparseGPT (Frantar & Alistarh, 2023) as DSnoT's third initial method (SPEC §2).

The original DSnoT code never accumulated the Hessian, so its "sparsegpt" path pruned the
first ``k`` columns [deviation]. Here it is the real algorithm: ``H = (2/N) Σ x xᵀ``, damping
``0.01 · mean(diag H)``, the upper Cholesky factor ``U`` of ``H⁻¹``, columns processed in blocks
of 128 with the optimal-brain-surgeon update of the not-yet-processed weights.

Choices of this implementation (documented in the README):
- unstructured masks are chosen *per row* inside each block (SparseGPT picks a per-block
  threshold over all rows): block ``[i1, i2)`` prunes ``floor(i2·s) − floor(i1·s)`` weights
  of every row, so each row prunes exactly ``floor(in·s)``, like the other initial methods;
- N:M groups are aligned to the global column index (the block size is a multiple of M);
- the returned weights hold, at *pruned* positions, the value SparseGPT had updated that
  weight to just before pruning it, so a weight DSnoT regrows comes back with it;
- the score (for N:M partner choice) is SparseGPT's saliency ``w² / U_jj²`` of those weights.
"""
from __future__ import annotations

import math

import torch

from .reference import initial_mask_from_score

BLOCK = 128
DAMP = 0.01


def _inverse_cholesky(hessian: torch.Tensor, weight: torch.Tensor):
    """Damped ``U = chol(H⁻¹)ᵀ`` (upper) and the dead-column mask, computed in float64."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = DAMP * torch.mean(torch.diagonal(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    upper = torch.linalg.cholesky(h_inv, upper=True)
    return upper.to(torch.float32), dead


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    prune_n: int = 0, prune_m: int = 0):
    """Run SparseGPT on ``weight`` ``[out, in]`` with ``hessian`` ``[in, in]``.

    Returns ``(mask, updated_weight, score)``: bool ``[out, in]`` (True = pruned); float32
    ``[out, in]`` weights after the update, pruned positions not zeroed; float32 saliency.
    """
    rows, cols = weight.shape
    w = weight.to(torch.float32).clone()
    upper, dead = _inverse_cholesky(hessian, w)
    w[:, dead] = 0
    diag = torch.diagonal(upper)
    block = BLOCK - BLOCK % prune_m if prune_m else BLOCK
    block = max(block, prune_m)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        d1 = diag[i1:i2]
        err1 = torch.zeros_like(w1)
        before = torch.zeros_like(w1)              # value of each weight when it is processed
        if not prune_m:
            per_row = math.floor(i2 * sparsity + 1e-9) - math.floor(i1 * sparsity + 1e-9)
            mask1 = initial_mask_from_score(w1 ** 2 / d1 ** 2, per_row)   # lowest per row, ties: lower column
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_m and i % prune_m == 0:
                group = slice(i, i + prune_m)
                mask1[:, group] = initial_mask_from_score(w1[:, group] ** 2 / d1[group] ** 2, prune_n)
            col = w1[:, i]
            before[:, i] = col
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / d1[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        # kept weights take their updated value; pruned ones keep the value they had when pruned
        w[:, i1:i2] = torch.where(mask1, before, w1)
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    score = w ** 2 / diag ** 2
    return mask, w, score


def sparsegpt_saliency(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency ``w² / U_jj²`` of ``weight`` without any update (float32 ``[out, in]``);
    0 on dead columns (``H_jj = 0``: an input that is always zero), whose weights SparseGPT zeroes."""
    upper, dead = _inverse_cholesky(hessian, weight)
    score = weight.to(torch.float32) ** 2 / torch.diagonal(upper) ** 2
    score[:, dead] = 0
    return score

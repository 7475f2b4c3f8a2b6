"""SparseGPT as DSnoT's initial method (SPEC §2, dsnot_kernels/sparsegpt.py).

Checked: the pruned count (floor(in·s) per row, N per group of M, including block sizes that
M does not divide); the weight update lowers the layer's output reconstruction error on the
calibration inputs below plain masking of the original weights (a property that fails if the
update is wrong); pruned positions carry the value they had when pruned; refine() runs DSnoT
on the updated weights.
"""
from __future__ import annotations

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels.sparsegpt import BLOCK, sparsegpt_prune, sparsegpt_saliency


def calibration(out_features: int, in_features: int, seed: int, tokens: int = 256, samples: int = 4):
    """Correlated inputs ``x`` ``[tokens, in]`` (SparseGPT's update only helps when channels
    correlate), the Hessian ``(2/N) Σ x xᵀ`` from the accumulator, and a weight."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen) / in_features ** 0.5 + torch.eye(in_features)
    x = torch.randn(tokens, in_features, generator=gen) @ mix + torch.randn(in_features, generator=gen) * 0.3
    acc = dk.StatsAccumulator(in_features, hessian=True)
    acc.update(x.reshape(samples, tokens // samples, in_features))
    weight = torch.randn(out_features, in_features, generator=gen)
    return x, acc.finalize(), weight


def output_error(x: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """``||X Wᵀ − X W_sparseᵀ||²`` in float64."""
    x = x.double()
    return float((x @ dense.double().t() - x @ sparse.double().t()).pow(2).sum())


CASES = [
    pytest.param("unstructured", 0.5, 300, id="I300-u50"),      # blocks 128, 128, 44
    pytest.param("unstructured", 0.6, 300, id="I300-u60"),
    pytest.param("unstructured", 0.7, 256, id="I256-u70"),
    pytest.param("2:4", 0.5, 300, id="I300-2:4"),
    pytest.param("4:8", 0.5, 264, id="I264-4:8"),
    pytest.param("1:3", 1 / 3, 300, id="I300-1:3"),              # 3 does not divide 128: block 126
    pytest.param("3:4", 0.75, 132, id="I132-3:4"),
]


@pytest.mark.parametrize("pattern, sparsity, cols", CASES)
def test_counts_and_reconstruction(pattern, sparsity, cols):
    x, stats, weight = calibration(24, cols, seed=cols)
    n, m = dk.parse_pattern(pattern)
    mask, updated, score = sparsegpt_prune(weight, stats.hessian, sparsity, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert updated.dtype == torch.float32 and score.shape == weight.shape
    if m:
        assert bool((mask.reshape(24, cols // m, m).sum(-1) == n).all()), "not N per group"
    else:
        expected = dk.RefineConfig(sparsity=sparsity).pruned_per_row(cols)
        assert bool((mask.sum(1) == expected).all()), f"rows prune {mask.sum(1).unique().tolist()}, want {expected}"
    # the update compensates for the pruned weights: better than masking the original weights
    plain = output_error(x, weight, weight.masked_fill(mask, 0))
    compensated = output_error(x, weight, updated.masked_fill(mask, 0))
    assert compensated < 0.8 * plain, f"update error {compensated:.4g} vs plain masking {plain:.4g}"
    assert bool(torch.isfinite(updated).all())


def test_pruned_positions_hold_their_value_when_pruned():
    x, stats, weight = calibration(16, 256, seed=1)
    mask, updated, _ = sparsegpt_prune(weight, stats.hessian, 0.5)
    # every pruned position holds a non-zero value (DSnoT may regrow it)
    assert bool((updated[mask] != 0).all())
    # column 0 is processed first: nothing updated it before it was pruned
    first = mask[:, 0]
    assert first.any()
    assert torch.equal(updated[first, 0], weight[first, 0])
    # later columns were moved by the updates of earlier ones, pruned or kept
    assert not torch.equal(updated[:, 1:], weight[:, 1:])
    # and in the second block, pruned values differ from the original (updates crossed blocks)
    later = mask[:, BLOCK:]
    assert not torch.equal(updated[:, BLOCK:][later], weight[:, BLOCK:][later])


def test_dead_input_channel():
    """An input channel that is always zero (H_jj = 0) does not break the factorisation."""
    x, _, weight = calibration(8, 64, seed=2)
    x[:, 5] = 0
    acc = dk.StatsAccumulator(64, hessian=True)
    acc.update(x)
    mask, updated, _ = sparsegpt_prune(weight, acc.finalize().hessian, 0.5)
    assert bool(torch.isfinite(updated).all())
    assert bool((mask.sum(1) == 32).all())
    assert bool((updated[:, 5] == 0).all())          # a dead channel's weight carries nothing
    # the saliency without the update (N:M partner score for a given mask) agrees: 0 there
    score = sparsegpt_saliency(weight, acc.finalize().hessian)
    assert bool((score[:, 5] == 0).all()) and bool((score[:, :5] > 0).all())


def test_saliency_formula():
    _, stats, weight = calibration(4, 32, seed=3)
    h = stats.hessian.double()
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(32, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    expected = weight.double() ** 2 / torch.diagonal(u) ** 2
    torch.testing.assert_close(sparsegpt_saliency(weight, stats.hessian).double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_refine_runs_dsnot_on_updated_weights(pattern, sparsity, dtype):
    x, stats, weight = calibration(20, 128, seed=4)
    weight = weight.to(dtype)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, init="sparsegpt")
    res0 = dk.refine(weight, stats, dk.RefineConfig(**{**cfg.__dict__, "max_cycle_time": 0}), backend="torch")
    res = dk.refine(weight, stats, cfg, backend="torch")
    n, m = cfg.nm
    mask, updated, _ = sparsegpt_prune(weight, stats.hessian, sparsity, n, m)
    # the initial mask is SparseGPT's; the weights are its update, in the layer's dtype
    assert torch.equal(res0.pruned_mask, mask)
    assert res.updated_weight.dtype == dtype
    assert torch.equal(res.updated_weight, updated.to(dtype))
    # DSnoT's row errors are those of the updated weights (SPEC §2: it runs on them)
    d = (res.updated_weight.float() * stats.sum_metric_row).double()
    torch.testing.assert_close(res.error_before.double(), (d * mask).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.error_after.double(), (d * res.pruned_mask).sum(1), rtol=1e-5, atol=1e-5)
    assert int(res.swaps.sum()) > 0
    # the torch backend and the reference agree on this problem too
    ref = dk.refine(weight, stats, cfg, backend="reference")
    assert torch.equal(ref.pruned_mask, res.pruned_mask) and torch.equal(ref.swaps, res.swaps)


def test_refine_sparsegpt_with_given_mask():
    """With a caller's mask SparseGPT does not run: no updated weights, the mask is refined."""
    _, stats, weight = calibration(8, 64, seed=5)
    mask = torch.zeros(8, 64, dtype=torch.bool)
    mask.view(8, 16, 4)[..., :2] = True
    res = dk.refine(weight, stats, dk.RefineConfig(pattern="2:4", init="sparsegpt", max_cycle_time=0),
                    backend="torch", initial_mask=mask)
    assert res.updated_weight is None
    assert torch.equal(res.pruned_mask, mask)

"""StatsAccumulator (SPEC §1) against a float64 computation from the raw samples.

For samples ``x_n`` of ``L_n`` tokens (``N`` samples, ``T = Σ L_n`` tokens):
``S = (1/N) Σ_n Σ_t x``, ``Q = (1/N) Σ_n Σ_t x²``,
``V = Σ_n L_n · popvar_t(x_n) / T`` (the token-weighted mean of within-sample variances),
``H = (2/N) Σ_n Σ_t x xᵀ``. The result must not depend on how samples are batched.
"""
from __future__ import annotations

from typing import List

import pytest
import torch

import dsnot_kernels as dk

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RTOL = 1e-5


def float64_stats(samples: List[torch.Tensor]):
    """``(S, Q, V, H)`` in float64 from a list of ``[L_n, in]`` samples (values as given)."""
    xs = [x.to(torch.float64) for x in samples]
    n = len(xs)
    tokens = sum(x.shape[0] for x in xs)
    s = sum(x.sum(0) for x in xs) / n
    q = sum((x * x).sum(0) for x in xs) / n
    v = sum(x.shape[0] * x.var(0, unbiased=False) for x in xs) / tokens
    h = sum(x.t() @ x for x in xs) * (2.0 / n)
    return s, q, v, h


def assert_stats_match(stats: dk.LayerStats, samples: List[torch.Tensor], label: str, hessian=False):
    s, q, v, h = float64_stats(samples)
    assert stats.nsamples == len(samples)
    assert stats.ntokens == sum(x.shape[0] for x in samples)
    for name in ("sum_metric_row", "scaler_row", "var"):
        assert getattr(stats, name).dtype == torch.float32, name
    # S is a signed sum: its float32 rounding is relative to the summed magnitudes
    abs_sum = sum(x.to(torch.float64).abs().sum(0) for x in samples) / len(samples)
    for name, got, want, floor in (("S", stats.sum_metric_row, s, abs_sum * 1e-6),
                                   ("Q", stats.scaler_row, q, 0.0),
                                   ("V", stats.var, v, 0.0)):
        err = (got.double() - want).abs()
        tol = RTOL * want.abs() + floor + 1e-30
        bad = err > tol
        assert not bool(bad.any()), (f"{label}: {name}[{int(bad.nonzero()[0])}] = {got[bad][0].item()}, "
                                     f"float64 {want[bad][0].item()}")
    if hessian:
        assert stats.hessian is not None and stats.hessian.shape == h.shape
        # entries are bounded by sqrt(H_ii H_jj) (Cauchy-Schwarz): the natural scale of each error
        scale = torch.sqrt(torch.outer(torch.diagonal(h), torch.diagonal(h)))
        err = (stats.hessian.double() - h).abs()
        assert bool((err <= RTOL * scale + 1e-30).all()), f"{label}: hessian max error {float(err.max())}"
    else:
        assert stats.hessian is None


def make_samples(count: int, seq: int, width: int, dtype, seed: int, offset: float = 0.0,
                 noise: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randn(width, generator=gen) * 2 + offset
    scale = torch.rand(width, generator=gen) * 2 + 0.1
    x = torch.randn(count, seq, width, generator=gen) * scale * noise + shift
    return x.to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batching", ["one-batch", "batches-of-3", "batches-of-1", "tokens-per-sample"])
def test_matches_float64_whatever_the_batching(dtype, batching):
    x = make_samples(10, 24, 40, DTYPES[dtype], seed=1)
    acc = dk.StatsAccumulator(40, hessian=True)
    if batching == "one-batch":
        acc.update(x)
    elif batching == "tokens-per-sample":
        for sample in x:
            acc.update(sample)                         # [tokens, in]: one sample
    else:
        step = 3 if batching == "batches-of-3" else 1
        for b0 in range(0, 10, step):
            acc.update(x[b0:b0 + step])
    assert_stats_match(acc.finalize(), list(x), f"{batching}-{dtype}", hessian=True)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_batchings_agree(dtype):
    """Different batchings of the same samples give the same statistics (to float32 rounding)."""
    x = make_samples(12, 16, 24, DTYPES[dtype], seed=2)
    one, many = dk.StatsAccumulator(24), dk.StatsAccumulator(24)
    one.update(x)
    for part in (x[:5], x[5:6], x[6:]):
        many.update(part)
    a, b = one.finalize(), many.finalize()
    for name in ("sum_metric_row", "scaler_row", "var"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_samples_of_different_lengths(dtype):
    """Mixed sequence lengths: V weights each sample's variance by its token count."""
    parts = [make_samples(2, 16, 32, DTYPES[dtype], seed=3),
             make_samples(3, 40, 32, DTYPES[dtype], seed=4, offset=3.0),
             make_samples(1, 7, 32, DTYPES[dtype], seed=5, noise=4.0)[0]]      # [tokens, in]
    acc = dk.StatsAccumulator(32, hessian=True)
    for p in parts:
        acc.update(p)
    samples = list(parts[0]) + list(parts[1]) + [parts[2]]
    assert_stats_match(acc.finalize(), samples, f"mixed-lengths-{dtype}", hessian=True)


def test_within_sample_variance_not_global():
    """V is the within-sequence variance: samples that differ only by a constant shift have
    the same V as each alone, while a global variance would be much larger."""
    base = make_samples(1, 32, 8, torch.float32, seed=6)[0]
    acc = dk.StatsAccumulator(8)
    acc.update(torch.stack([base, base + 100.0]))
    stats = acc.finalize()
    torch.testing.assert_close(stats.var, base.double().var(0, unbiased=False).float(), rtol=RTOL, atol=0)
    global_var = torch.cat([base, base + 100.0]).double().var(0, unbiased=False)
    assert bool((global_var > 100 * stats.var.double()).all())


def test_numerically_sound_with_large_offset():
    """A large mean and a small spread: a one-pass float32 Σx² − (Σx)²/L would lose V."""
    x = make_samples(6, 64, 16, torch.float32, seed=7, offset=1000.0, noise=0.01)
    for step in (6, 2, 1):
        acc = dk.StatsAccumulator(16)
        for b0 in range(0, 6, step):
            acc.update(x[b0:b0 + step])
        assert_stats_match(acc.finalize(), list(x), f"offset-step{step}")


def test_finalize_keeps_accumulating():
    x = make_samples(6, 8, 12, torch.float32, seed=8)
    acc = dk.StatsAccumulator(12)
    acc.update(x[:2])
    first = acc.finalize()
    assert_stats_match(first, list(x[:2]), "first-two")
    acc.update(x[2:])
    assert_stats_match(acc.finalize(), list(x), "all-six")
    acc.update(x[:0])                               # an empty batch changes nothing
    assert acc.finalize().nsamples == 6


def test_hessian_definition():
    x = make_samples(3, 5, 6, torch.float32, seed=9)
    acc = dk.StatsAccumulator(6, hessian=True)
    acc.update(x)
    flat = x.reshape(-1, 6).double()
    torch.testing.assert_close(acc.finalize().hessian.double(), (2.0 / 3) * flat.t() @ flat,
                               rtol=1e-6, atol=1e-6)


def test_stats_feed_refine():
    """Statistics from the accumulator are accepted by refine (float32, right shape)."""
    x = make_samples(4, 16, 32, torch.bfloat16, seed=10)
    acc = dk.StatsAccumulator(32, hessian=True)
    acc.update(x)
    stats = acc.finalize()
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for init in ("wanda", "sparsegpt"):
        res = dk.refine(weight, stats, dk.RefineConfig(init=init), backend="reference")
        assert res.pruned_mask.sum().item() == 8 * 16


# ---- errors ---------------------------------------------------------------------------------
def test_finalize_without_samples_raises():
    acc = dk.StatsAccumulator(8)
    with pytest.raises(ValueError, match="no samples"):
        acc.finalize()
    acc.update(torch.zeros(0, 4, 8))                # empty: still no samples
    with pytest.raises(ValueError, match="no samples"):
        acc.finalize()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"], ids=["zero", "negative", "float", "str"])
def test_bad_in_features(bad):
    with pytest.raises((ValueError, TypeError), match="in_features"):
        dk.StatsAccumulator(bad)


@pytest.mark.parametrize("x, exc", [
    (torch.zeros(4, 9), ValueError),               # wrong width
    (torch.zeros(2, 4, 9), ValueError),
    (torch.zeros(8), ValueError),                  # 1-D
    (torch.zeros(1, 2, 3, 8), ValueError),         # 4-D
    (torch.zeros(2, 4, 8, dtype=torch.int32), TypeError),
    (torch.zeros(2, 4, 8, dtype=torch.bool), TypeError),
    (torch.zeros(2, 4, 8, dtype=torch.complex64), TypeError),
    ([[0.0] * 8], TypeError),                      # not a tensor
], ids=["tokens-wrong-width", "batch-wrong-width", "1d", "4d", "int32", "bool", "complex", "list"])
def test_bad_update_input(x, exc):
    acc = dk.StatsAccumulator(8)
    with pytest.raises(exc, match=r"\bx\b"):
        acc.update(x)
    assert acc.nsamples == 0


def test_device_change_between_batches_raises():
    acc = dk.StatsAccumulator(8)
    acc.update(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"\bx\b.*meta"):
        acc.update(torch.randn(2, 4, 8, device="meta"))


# ---- CUDA (the fused statistics kernel when Triton is present); skipped without a GPU ---------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batching", ["one-batch", "batches-of-3", "tokens-per-sample"])
def test_cuda_matches_float64(dtype, batching):
    x = make_samples(10, 24, 40, DTYPES[dtype], seed=11)
    acc = dk.StatsAccumulator(40, hessian=True)
    xc = x.cuda()
    if batching == "one-batch":
        acc.update(xc)
    elif batching == "tokens-per-sample":
        for sample in xc:
            acc.update(sample)
    else:
        for b0 in range(0, 10, 3):
            acc.update(xc[b0:b0 + 3])
    stats = acc.finalize()
    assert stats.sum_metric_row.device.type == "cuda"
    assert_stats_match(stats.to("cpu"), list(x), f"cuda-{batching}-{dtype}", hessian=True)


@pytest.mark.gpu
def test_cuda_numerically_sound_with_large_offset():
    x = make_samples(6, 64, 16, torch.float32, seed=7, offset=1000.0, noise=0.01)
    acc = dk.StatsAccumulator(16)
    for b0 in range(0, 6, 2):
        acc.update(x[b0:b0 + 2].cuda())
    assert_stats_match(acc.finalize().to("cpu"), list(x), "cuda-offset")


@pytest.mark.gpu
def test_cuda_float64_input_takes_the_torch_path():
    """The statistics kernel reads fp16/bf16/fp32: float64 CUDA samples go through the torch
    path (automatically, not as a TypeError) and equal the float64 computation."""
    x = make_samples(4, 16, 24, torch.float64, seed=5)
    acc = dk.StatsAccumulator(24)
    acc.update(x.cuda())
    assert_stats_match(acc.finalize().to("cpu"), list(x), "cuda-float64")

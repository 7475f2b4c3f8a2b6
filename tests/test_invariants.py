"""Invariants of any refinement on random problems (DESIGN.md, correctness rule 2), via hypothesis.

For every backend that runs here ("reference" and "torch"; the Triton and extension backends
have their own parity tests): the pruned count per row is unchanged (unstructured) or exactly
N per group (N:M); each column flips at most once; ``swaps <= max_cycle_time`` and equals the
number of grown columns; ``error_before``/``error_after`` equal a float64 recomputation from
the initial/final mask; the layer's weight is never modified.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dsnot_kernels as dk

BACKENDS = ("reference", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATTERNS = ("unstructured", "1:2", "2:4", "1:4", "3:4", "4:8", "2:8", "8:16")
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """A random layer, statistics, config and (sometimes) a given initial mask."""
    pattern = draw(st.sampled_from(PATTERNS))
    m = dk.parse_pattern(pattern)[1]
    rows = draw(st.integers(1, 12))
    cols = m * draw(st.integers(1, 24)) if m else draw(st.integers(1, 160))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES))
    ties = draw(st.booleans())
    if ties:   # coarse values: many exact ties in W, D, G and A, some zeros
        weight = (torch.randint(-4, 5, (rows, cols), generator=gen) / 2.0).to(dtype)
        grid = torch.tensor([-1.0, 0.0, 0.5, 1.0])
        s = grid[torch.randint(4, (cols,), generator=gen)]
        q = torch.tensor([1.0, 4.0])[torch.randint(2, (cols,), generator=gen)]
        v = torch.tensor([0.0, 1.0, 3.0])[torch.randint(3, (cols,), generator=gen)]
    else:
        weight = (torch.randn(rows, cols, generator=gen) * draw(st.sampled_from([0.01, 1.0, 30.0]))).to(dtype)
        s = torch.randn(cols, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))
        q = s * s + torch.rand(cols, generator=gen)
        v = torch.rand(cols, generator=gen) * 2
    stats = dk.LayerStats(sum_metric_row=s, scaler_row=q, var=v, nsamples=2, ntokens=draw(st.integers(2, 64)))
    cfg = dk.RefineConfig(
        sparsity=draw(st.sampled_from([0.0, 0.1, 0.5, 0.6, 0.7, 0.9, 0.99])),
        pattern=pattern, init=draw(st.sampled_from(["wanda", "magnitude"])),
        max_cycle_time=draw(st.integers(0, 60)),
        update_threshold=draw(st.sampled_from([0.0, 0.1, 1.0])),
        pow_of_var_regrowing=draw(st.sampled_from([0.0, 1.0, 2.0])),
        sign_check=draw(st.sampled_from([None, True, False])),
        improve_check=draw(st.booleans()), moment_check=draw(st.booleans()),
        cycle_fraction=draw(st.sampled_from([None, None, 0.25])))
    mask = None
    if draw(st.booleans()):
        if m:
            n = cfg.nm[0]
            ranks = torch.rand(rows, cols // m, m, generator=gen).argsort(-1).argsort(-1)
            mask = (ranks < n).reshape(rows, cols)
        else:
            mask = torch.rand(rows, cols, generator=gen) < torch.rand(rows, 1, generator=gen)
    as_linear = draw(st.booleans())
    return weight, stats, cfg, mask, as_linear


def row_error(weight: torch.Tensor, stats: dk.LayerStats, mask: torch.Tensor) -> torch.Tensor:
    """float64 ``Σ_{pruned j} W[j]·S[j]`` (with D rounded to float32 as SPEC §3 defines it)."""
    d = weight.to(torch.float32) * stats.sum_metric_row.to(torch.float32)
    return torch.where(mask, d.double(), torch.zeros((), dtype=torch.float64)).sum(1)


def assert_close_errors(name: str, got: torch.Tensor, weight, stats, mask) -> None:
    expected = row_error(weight, stats, mask)
    # 1e-4 relative to the row's error, floored by the summed magnitudes (cancellation) times eps
    scale = (weight.to(torch.float32) * stats.sum_metric_row).abs().double().sum(1)
    tol = 1e-4 * expected.abs() + 1e-6 * scale + 1e-30
    bad = (got.double() - expected).abs() > tol
    assert not bool(bad.any()), (f"{name}: row {int(bad.nonzero()[0])}: got {got[bad][0].item()}, "
                                 f"float64 recomputation {expected[bad][0].item()}")


@SETTINGS
@given(problems(), st.sampled_from(BACKENDS))
def test_invariants(problem, backend):
    weight, stats, cfg, given_mask, as_linear = problem
    rows, cols = weight.shape
    original = weight.clone()
    if as_linear:
        layer = torch.nn.Linear(cols, rows, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
    else:
        layer = weight

    res = dk.refine(layer, stats, cfg, backend=backend, initial_mask=given_mask)
    initial = dk.refine(layer, stats, dk.RefineConfig(**{**cfg.__dict__, "max_cycle_time": 0}),
                        backend=backend, initial_mask=given_mask)
    final, start = res.pruned_mask, initial.pruned_mask
    event("swaps happened" if int(res.swaps.sum()) else "no swaps")

    # the layer is never modified
    current = layer.weight.detach() if as_linear else layer
    assert torch.equal(current, original)

    # shapes and types
    assert final.dtype == torch.bool and final.shape == (rows, cols)
    assert res.swaps.dtype == torch.int32 and res.swaps.shape == (rows,)
    assert res.error_before.dtype == res.error_after.dtype == torch.float32
    if given_mask is not None:
        assert torch.equal(start, given_mask)
    assert int(initial.swaps.sum()) == 0 and torch.equal(initial.error_after, initial.error_before)
    assert torch.equal(res.error_before, initial.error_before)

    # pruned count per row (unstructured) / N per group (N:M)
    n, m = cfg.nm
    if m:
        assert bool((final.reshape(rows, cols // m, m).sum(-1) == n).all())
    else:
        assert torch.equal(final.sum(1), start.sum(1))
        if given_mask is None:
            assert bool((start.sum(1) == cfg.pruned_per_row(cols)).all())

    # each column flips at most once: every change from the initial mask is one swap half
    grown = (start & ~final).sum(1)
    newly_pruned = (~start & final).sum(1)
    assert torch.equal(grown, res.swaps.to(torch.int64))
    assert torch.equal(newly_pruned, res.swaps.to(torch.int64))
    assert bool((res.swaps <= cfg.max_cycle_time).all())
    assert bool((res.swaps <= cfg.cycles_for(cols)).all())

    # reported errors equal a float64 recomputation from the masks
    assert_close_errors("error_before", res.error_before, weight, stats, start)
    assert_close_errors("error_after", res.error_after, weight, stats, final)

    # a row below the threshold from the start never swaps
    quiet = res.error_before.abs() <= cfg.update_threshold
    assert int(res.swaps[quiet].sum()) == 0

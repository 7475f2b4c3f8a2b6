"""Value checks (NaN/inf, negatives, N:M mask counts) judged after the kernels are queued.

``refine`` queues the checks' reductions, starts one transfer of their verdicts, queues the
backend's kernels and only then waits (triton; ext on CUDA), so a GPU never idles while the
host judges. These tests pin what that must keep: every bad value still raises a ValueError
that names the argument, for single and batched calls, the kernels survive non-finite input
(bounded loops, no crash), and nothing the caller owns is written.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels.api import _ValueChecks, build_problem
from dsnot_kernels.backends import run_backend, unavailable_reason

from helpers import make_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS, COLS = 6, 32


def _poison(t: torch.Tensor, value: float = math.nan, at: int = 3) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[at] = value
    return t


def _stats_with(stats, **fields):
    return dataclasses.replace(stats, **fields)


# (case, make(weight, stats) -> (weight, stats, cfg, initial_mask), expected text in the error)
BAD_VALUES = {
    "weight-nan": (lambda w, s: (_poison(w), s, None, None), "layer weight contains NaN or inf"),
    "weight-minus-inf": (lambda w, s: (_poison(w, -math.inf), s, None, None), "layer weight contains NaN"),
    "sum_metric_row-inf": (lambda w, s: (w, _stats_with(s, sum_metric_row=_poison(s.sum_metric_row, math.inf)),
                                         None, None), "stats.sum_metric_row contains NaN or inf"),
    "scaler_row-negative": (lambda w, s: (w, _stats_with(s, scaler_row=-s.scaler_row), None, None),
                            "stats.scaler_row must be >= 0"),
    "var-nan": (lambda w, s: (w, _stats_with(s, var=_poison(s.var)), None, None), "stats.var contains NaN"),
    "nm-mask-count": (lambda w, s: (w, s, dk.RefineConfig(pattern="2:4"),
                                    torch.zeros(ROWS, COLS, dtype=torch.bool, device=w.device)),
                      "initial_mask must prune exactly 2 of every 4"),
}


def _backends():
    names = ["reference", "torch"]
    for name in ("triton", "ext"):
        if unavailable_reason(name, DEVICE, nm=True) is None:
            names.append(name)
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_raise_on_every_backend(case, backend):
    make, text = BAD_VALUES[case]
    weight, stats = make_layer(ROWS, COLS, torch.float16, seed=1)
    weight, stats = weight.to(DEVICE), stats.to(DEVICE)
    w, s, cfg, mask = make(weight, stats)
    if backend == "ext" and unavailable_reason("ext", DEVICE, nm=(cfg or dk.RefineConfig()).nm[1] > 0):
        pytest.skip("ext has no path for this pattern here")
    w_before = w.clone()
    with pytest.raises(ValueError, match=text.replace(".", r"\.")):
        dk.refine(w, s, cfg, backend=backend, initial_mask=mask)
    assert torch.equal(w.view(torch.int16), w_before.view(torch.int16)), "refine wrote the caller's weight"


@pytest.mark.parametrize("backend", _backends())
def test_refine_many_names_the_bad_layer(backend):
    weights = [make_layer(ROWS, COLS, torch.float16, seed=i)[0].to(DEVICE) for i in range(3)]
    stats = make_layer(ROWS, COLS, torch.float16, seed=0)[1].to(DEVICE)
    weights[2] = _poison(weights[2], math.inf)
    with pytest.raises(ValueError, match=r"layers\[2\] weight contains NaN or inf"):
        dk.refine_many(weights, stats, backend=backend)
    # the same layers without the bad one go through
    results = dk.refine_many(weights[:2], stats, backend=backend)
    assert [r.pruned_mask.shape for r in results] == [(ROWS, COLS)] * 2


@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_kernels_survive_non_finite_input(backend, pattern):
    """The backends that run before the verdict (triton; ext on CUDA) must terminate and stay
    in bounds on NaN/inf weights and statistics: their outputs are dropped, but a hang or an
    out-of-bounds write would not be. (ext is run on CPU here when that is all there is: the
    same C++ row code as its CUDA kernel.)"""
    nm = pattern != "unstructured"
    if unavailable_reason(backend, DEVICE, nm=nm) is not None:
        pytest.skip(unavailable_reason(backend, DEVICE, nm=nm))
    weight, stats = make_layer(ROWS, COLS, torch.float32, seed=2)
    problem, _ = build_problem(weight.to(DEVICE), stats.to(DEVICE), dk.RefineConfig(pattern=pattern, sparsity=0.5))
    bad_weight = _poison(_poison(problem.weight, math.nan, at=5), math.inf, at=COLS + 7)
    bad_weight.view(-1)[2 * COLS + 1] = -math.inf
    bad_sum = _poison(problem.sum_metric_row, math.nan, at=9)
    for bad in (dataclasses.replace(problem, weight=bad_weight),
                dataclasses.replace(problem, sum_metric_row=bad_sum),
                dataclasses.replace(problem, var_pow=_poison(problem.var_pow, math.inf, at=4))):
        out = run_backend(backend, bad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert out.pruned_mask.shape == (ROWS, COLS) and out.swaps.shape == (ROWS,)
        # rows without a bad value are untouched by the poison: equal to the clean run's rows
        clean = run_backend(backend, problem)
        bad_rows = torch.zeros(ROWS, dtype=torch.bool)
        if bad.weight is bad_weight:
            bad_rows[:3] = True
        else:
            bad_rows[:] = True      # a bad column factor reaches every row
        keep = ~bad_rows
        assert torch.equal(out.pruned_mask.cpu()[keep], clean.pruned_mask.cpu()[keep])
        assert torch.equal(out.swaps.cpu()[keep], clean.swaps.cpu()[keep])
        # every row keeps its swap bound; a poisoned S or V^p (which reaches every row) leaves
        # the initial scores clean, and swaps keep the pattern's counts. (A NaN initial score
        # may break a group's count in the ext kernel: outputs of bad input are dropped.)
        swaps = out.swaps.cpu()
        assert bool(((swaps >= 0) & (swaps <= problem.cycles)).all())
        pruned = out.pruned_mask.cpu()
        if bad.weight is bad_weight:
            continue
        if nm:
            assert bool((pruned.reshape(ROWS, -1, 4).sum(-1) == 2).all())
        else:
            assert bool((pruned.sum(1) == problem.pruned_per_row).all())


def test_value_checks_order_dtypes_and_flags():
    """One transfer for mixed dtypes (fp16, fp32, float64, bool flags); the first failure in
    queue order is raised; a clean set passes; judging twice judges nothing new."""
    checks = _ValueChecks()
    checks.finite("a", torch.tensor([1.0, 2.0], dtype=torch.float16))
    checks.finite("b", torch.tensor([0.0, 3.0]), nonnegative=True)
    checks.finite("c", torch.tensor([3e38, -3e38], dtype=torch.float64))    # within float32's range
    checks.flag("d is bad", torch.tensor(False))
    checks.finite("empty", torch.empty(0))
    checks.judge()
    checks.judge()

    # finite in float64 but not in float32, where the backends compute: refused
    checks = _ValueChecks()
    checks.finite("c", torch.tensor([1.0, -1e300], dtype=torch.float64))
    with pytest.raises(ValueError, match="c holds values beyond float32's range"):
        checks.judge()

    checks = _ValueChecks()
    checks.finite("a", torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    checks.flag("flag one", torch.tensor(True))
    checks.finite("b", torch.tensor([math.nan]))
    with pytest.raises(ValueError, match="flag one"):
        checks.judge()

    checks = _ValueChecks()
    checks.finite("first", torch.tensor([-1.0]), nonnegative=True)
    checks.send()                                     # a second batch after a send
    checks.finite("second", torch.tensor([math.inf]))
    with pytest.raises(ValueError, match="first must be >= 0"):
        checks.judge()


@pytest.mark.gpu
def test_deferred_checks_on_cuda():
    """On a GPU: the verdicts travel through pinned memory behind an event recorded before the
    kernels; a bad call raises, and calls queued before and after it are unaffected."""
    weight, stats = make_layer(64, 256, torch.float16, seed=3)
    weight, stats = weight.cuda(), stats.to("cuda")
    for pattern in ("unstructured", "2:4"):
        cfg = dk.RefineConfig(pattern=pattern, sparsity=0.5)
        for backend in ("triton", "ext"):
            if unavailable_reason(backend, "cuda", nm=pattern != "unstructured") is not None:
                continue
            good = dk.refine(weight, stats, cfg, backend=backend)
            with pytest.raises(ValueError, match="layer weight contains NaN or inf"):
                dk.refine(_poison(weight, math.inf, at=100), stats, cfg, backend=backend)
            with pytest.raises(ValueError, match=r"layers\[1\] weight"):
                dk.refine_many([weight, _poison(weight)], stats, cfg, backend=backend)
            again = dk.refine(weight, stats, cfg, backend=backend)
            assert torch.equal(good.pruned_mask, again.pruned_mask)
            assert torch.equal(good.swaps, again.swaps)

"""The fast "torch" backend equals the reference exactly (DESIGN.md, correctness rule 1).

Masks and swaps must be identical and errors equal to float32 rounding, on random layers
(continuous values, so score ties are improbable) across patterns, dtypes, odd and round
shapes, initial methods and configuration flags; and on layers built to be full of ties,
where both implementations follow the same stable tie rules (SPEC §2, §4).
"""
from __future__ import annotations

import pytest
import torch

import dsnot_kernels as dk
from helpers import DTYPES, assert_same_output, make_layer, non_finite_growth_layer, reference_output

UNSTRUCTURED = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7)]
NM = [("2:4", 0.5), ("4:8", 0.5), ("8:16", 0.5), ("1:4", 0.25), ("3:4", 0.75)]
SHAPES = [(7, 24), (33, 200), (64, 1000), (128, 256)]


def _fit(in_features: int, pattern: str) -> int:
    """Round ``in_features`` up to a multiple of the pattern's M (8:16 needs 16 | in)."""
    m = dk.parse_pattern(pattern)[1]
    return in_features if not m or in_features % m == 0 else in_features + m - in_features % m


def _label(rows, cols, pattern, sparsity, dtype, init, extra=""):
    pat = f"{pattern[0]}{int(round(sparsity * 100))}" if pattern == "unstructured" else pattern
    return f"O{rows}-I{cols}-{pat}-{dtype}-{init}" + (f"-{extra}" if extra else "")


def _run(weight, stats, cfg, label, initial_mask=None):
    _, expected = reference_output(weight, stats, cfg, initial_mask)
    res = dk.refine(weight, stats, cfg, backend="torch", initial_mask=initial_mask)
    assert res.backend == "torch"
    assert res.pruned_mask.dtype == torch.bool and res.pruned_mask.shape == weight.shape
    assert res.swaps.dtype == torch.int32 and res.error_after.dtype == torch.float32
    assert_same_output(expected, (res.pruned_mask, res.swaps, res.error_before, res.error_after), label)
    return res


# ---- the main grid: every pattern x dtype x shape (Wanda init, SPEC defaults) --------------
GRID = []
for _rows, _cols in SHAPES:
    for _pattern, _sparsity in UNSTRUCTURED + NM:
        for _dtype in DTYPES:
            _c = _fit(_cols, _pattern)
            GRID.append(pytest.param(_rows, _c, _pattern, _sparsity, _dtype,
                                     id=_label(_rows, _c, _pattern, _sparsity, _dtype, "wanda")))


@pytest.mark.parametrize("rows, cols, pattern, sparsity, dtype", GRID)
def test_parity_grid(rows, cols, pattern, sparsity, dtype):
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=rows * 1000 + cols)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)
    res = _run(weight, stats, cfg, _label(rows, cols, pattern, sparsity, dtype, "wanda"))
    # the comparison means something only if swaps happen
    assert res.swaps.float().mean() > 0, "no row swapped: the parity check is vacuous"
    expected_pruned = cfg.pruned_per_row(cols)
    assert bool((res.pruned_mask.sum(1) == expected_pruned).all())


# ---- initial methods, sign check, robust flags, cycle budgets -----------------------------
VARIANTS = []
for _pattern, _sparsity in [("unstructured", 0.6), ("2:4", 0.5), ("4:8", 0.5)]:
    for _init in ("wanda", "magnitude", "sparsegpt"):
        for _dtype in ("fp32", "fp16", "bf16"):
            VARIANTS.append(pytest.param(33, 200, _pattern, _sparsity, _dtype, _init, {},
                                         id=_label(33, 200, _pattern, _sparsity, _dtype, _init)))
    for _extra, _flags in [
        ("sign-on", dict(sign_check=True)),
        ("sign-off", dict(sign_check=False)),
        ("improve", dict(improve_check=True)),
        ("moment", dict(moment_check=True)),
        ("robust", dict(improve_check=True, moment_check=True)),
        ("cycfrac0.1", dict(cycle_fraction=0.1)),
        ("T3", dict(max_cycle_time=3)),
        ("T400", dict(max_cycle_time=400)),       # beyond every queue's length: empty-queue stops
        ("tau0", dict(update_threshold=0.0)),
        ("tau5", dict(update_threshold=5.0)),
        ("p0", dict(pow_of_var_regrowing=0.0)),
        ("p2", dict(pow_of_var_regrowing=2.0)),
    ]:
        VARIANTS.append(pytest.param(64, 1000, _pattern, _sparsity, "fp16", "wanda", _flags,
                                     id=_label(64, 1000, _pattern, _sparsity, "fp16", "wanda", _extra)))


@pytest.mark.parametrize("rows, cols, pattern, sparsity, dtype, init, flags", VARIANTS)
def test_parity_variants(rows, cols, pattern, sparsity, dtype, init, flags):
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=7, hessian=(init == "sparsegpt"))
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, init=init, **flags)
    res = _run(weight, stats, cfg, _label(rows, cols, pattern, sparsity, dtype, init, str(flags)))
    if flags.get("update_threshold", 0.1) < 1.0 and flags.get("max_cycle_time", 50) > 0:
        assert res.swaps.float().mean() > 0, "no row swapped: the parity check is vacuous"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_parity_given_initial_mask(pattern, dtype):
    """A caller's mask (random, not score-ordered) is refined identically."""
    rows, cols = 40, 96
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=11)
    gen = torch.Generator().manual_seed(3)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern)
    n, m = cfg.nm
    if m:
        ranks = torch.rand(rows, cols // m, m, generator=gen).argsort(-1).argsort(-1)
        mask = (ranks < n).reshape(rows, cols)
    else:
        # unstructured masks may prune a different count in each row
        mask = torch.rand(rows, cols, generator=gen) < torch.rand(rows, 1, generator=gen)
    res = _run(weight, stats, cfg, f"O{rows}-I{cols}-{pattern}-{dtype}-given-mask", initial_mask=mask)
    assert res.swaps.float().mean() > 0
    if not m:
        assert torch.equal(res.pruned_mask.sum(1), mask.sum(1))


@pytest.mark.parametrize("pattern, cols", [("1:256", 256), ("2:200", 400), ("100:200", 200),
                                           ("64:129", 258), ("127:128", 256)])
def test_parity_wide_groups(pattern, cols):
    """Groups wider than 127 (ranks and per-group counts do not fit int8)."""
    weight, stats = make_layer(6, cols, torch.float32, seed=5)
    cfg = dk.RefineConfig(pattern=pattern, max_cycle_time=20, update_threshold=0.01)
    res = _run(weight, stats, cfg, f"{pattern}-I{cols}")
    n, m = cfg.nm
    assert bool((res.pruned_mask.view(6, -1, m).sum(-1) == n).all())
    assert res.swaps.float().mean() > 0


# ---- ties ----------------------------------------------------------------------------------
def tie_layer(rows: int, cols: int, dtype: torch.dtype, seed: int):
    """Weights on a coarse grid (many equal |W|, some zeros) and column statistics taking
    only a few values, so that W, D, G and A are full of exact ties."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randint(-6, 7, (rows, cols), generator=gen) / 4.0).to(dtype)
    pick = lambda values: torch.tensor(values)[torch.randint(len(values), (cols,), generator=gen)]  # noqa: E731
    stats = dk.LayerStats(sum_metric_row=pick([-1.0, -0.5, 0.0, 0.5, 1.0]),
                          scaler_row=pick([1.0, 4.0]), var=pick([0.0, 1.0, 2.0]),
                          nsamples=4, ntokens=64)
    return weight, stats


@pytest.mark.parametrize("init", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.7),
                                                ("2:4", 0.5), ("4:8", 0.5), ("3:4", 0.75)],
                         ids=["u50", "u70", "2:4", "4:8", "3:4"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_parity_with_ties(dtype, pattern, sparsity, init):
    weight, stats = tie_layer(48, 64, DTYPES[dtype], seed=5)
    for sign_check in (False, True):
        cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, init=init, sign_check=sign_check,
                              update_threshold=0.0)
        res = _run(weight, stats, cfg, f"O48-I64-{pattern}-{dtype}-{init}-ties-sign{sign_check}")
        assert res.swaps.float().mean() > 0


def test_fp16_magnitude_ties_real_layer():
    """fp16 weights of a real-size row have many equal |w|: the magnitude mask must match."""
    weight, stats = make_layer(16, 2048, torch.float16, seed=2)
    assert len(torch.unique(weight.abs())) < weight.numel() // 2, "expected many equal |w|"
    for pattern in ("unstructured", "2:4"):
        cfg = dk.RefineConfig(sparsity=0.6, pattern=pattern, init="magnitude")
        res = _run(weight, stats, cfg, f"O16-I2048-{pattern}-fp16-magnitude")
        assert res.swaps.float().mean() > 0


def test_chunked_rows_match(monkeypatch):
    """Rows processed in several chunks (a tiny chunk size) give the same result."""
    import dsnot_kernels.torch_fast as tf
    weight, stats = make_layer(50, 120, torch.float16, seed=9)
    for pattern in ("unstructured", "2:4"):
        cfg = dk.RefineConfig(sparsity=0.6, pattern=pattern)
        whole = dk.refine(weight, stats, cfg, backend="torch")
        monkeypatch.setitem(tf.CHUNK_ELEMENTS, "cpu", 3 * 120)   # 3 rows per chunk, last one short
        chunked = dk.refine(weight, stats, cfg, backend="torch")
        monkeypatch.undo()
        assert_same_output((whole.pruned_mask, whole.swaps, whole.error_before, whole.error_after),
                           (chunked.pruned_mask, chunked.swaps, chunked.error_before, chunked.error_after),
                           f"chunked-{pattern}", error_rtol=0.0)


def test_zero_cycles_and_zero_sparsity():
    weight, stats = make_layer(9, 40, torch.float32, seed=4)
    for cfg in (dk.RefineConfig(max_cycle_time=0), dk.RefineConfig(sparsity=0.0),
                dk.RefineConfig(pattern="2:4", max_cycle_time=0)):
        res = _run(weight, stats, cfg, str(cfg))
        assert int(res.swaps.sum()) == 0
        assert torch.equal(res.error_before, res.error_after)


# ---- CUDA: the same backend on a GPU equals the CPU reference; skipped without a GPU ---------
@pytest.mark.gpu
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5), ("4:8", 0.5)],
                         ids=["u60", "2:4", "4:8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_parity_cuda(dtype, pattern, sparsity):
    weight, stats = make_layer(64, 1000, DTYPES[dtype], seed=21)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)
    _, expected = reference_output(weight, stats, cfg)
    res = dk.refine(weight.cuda(), stats.to("cuda"), cfg, backend="torch")
    assert res.pruned_mask.device.type == "cuda"
    assert_same_output(expected, (res.pruned_mask, res.swaps, res.error_before, res.error_after),
                       f"cuda-O64-I1000-{pattern}-{dtype}")
    assert res.swaps.float().mean() > 0


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_non_finite_growth_scores(pattern):
    """G = +-inf and NaN (zero-variance channels, p = 4): same masks as the reference."""
    w, stats, cfg = non_finite_growth_layer(pattern)
    res = _run(w, stats, cfg, f"{pattern}-non-finite-G")
    assert float(res.swaps.float().mean()) > 0


@pytest.mark.gpu
def test_cuda_stops_with_the_rows_not_at_max_cycle_time():
    """On CUDA the cycle loop never asks the GPU whether rows are still active, so it must be
    bounded by the queues: max_cycle_time 10^9 (otherwise ~10^9 steps of ~10 launches each)
    finishes and equals the reference."""
    weight, stats = make_layer(16, 64, torch.float32, seed=4)
    for pattern in ("unstructured", "2:4"):
        cfg = dk.RefineConfig(pattern=pattern, max_cycle_time=10 ** 9, update_threshold=0.0)
        expected = dk.refine(weight, stats, cfg, backend="reference")
        got = dk.refine(weight.cuda(), stats.to("cuda"), cfg, backend="torch")
        assert_same_output((expected.pruned_mask, expected.swaps, expected.error_before, expected.error_after),
                           (got.pruned_mask, got.swaps, got.error_before, got.error_after), f"cuda-{pattern}")

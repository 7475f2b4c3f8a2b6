"""The compiled backend ``"ext"`` (dsnot_kernels._C) against the reference oracle.

CPU path, N:M: every shape family (M = 4 / 8 / 16 use compile-time group code, M = 24 the
generic path), every weight dtype, odd row counts, each acceptance test, given initial masks,
each init method, ties. CPU path, unstructured: sparsities 0.5/0.6/0.7, every dtype, odd
shapes, budgets T = 0/1/3/1000, rows of very different scales (the queue floor guess), given
masks, init methods, heavy ties. GPU-marked tests run the CUDA path on CUDA tensors (LLaMA-size case
included). If the extension is not built the tests skip with the reason, unless
DSNOT_BUILD_EXT=1 says it must be there.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels import ext
from dsnot_kernels.api import build_problem
from dsnot_kernels.backends import choose_backend
from dsnot_kernels.reference import refine_reference

from helpers import DTYPES, assert_same_output, make_layer, non_finite_growth_layer, reference_output

REASON_CPU = ext.unavailable_reason(torch.device("cpu"))
if REASON_CPU is not None and os.environ.get("DSNOT_BUILD_EXT") == "1":
    raise RuntimeError(f"DSNOT_BUILD_EXT=1 but the extension is unusable: {REASON_CPU}")
pytestmark = pytest.mark.skipif(REASON_CPU is not None, reason=str(REASON_CPU))

# (pattern, rows, in_features): odd row counts, in_features divisible by M
SHAPES = [("2:4", 33, 240), ("4:8", 7, 240), ("8:16", 33, 240), ("1:4", 7, 240), ("3:4", 33, 240),
          ("5:24", 7, 240)]


def _parity(weight, stats, cfg, initial_mask=None, label=""):
    problem, expected = reference_output(weight, stats, cfg, initial_mask)
    actual = ext.refine_ext(problem)
    assert actual.pruned_mask.dtype == torch.bool and actual.swaps.dtype == torch.int32
    assert actual.error_after.dtype == torch.float32
    assert_same_output(expected, actual, label)
    return expected


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern,rows,cols", SHAPES, ids=[f"O{r}-I{c}-{p}" for p, r, c in SHAPES])
def test_cpu_matches_reference(pattern, rows, cols, dtype):
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=rows + cols)
    expected = _parity(weight, stats, dk.RefineConfig(pattern=pattern), label=f"{pattern}-{dtype}")
    assert expected.swaps.float().mean() > 0, "no swaps: the case would not test the loop"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_non_finite_growth_scores(pattern):
    """G = +-inf and NaN (zero-variance channels, p = 4): same masks as the reference."""
    weight, stats, cfg = non_finite_growth_layer(pattern)
    expected = _parity(weight, stats, cfg, label=f"{pattern}-non-finite-G")
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("sign_check", [False, True], ids=["sign-off", "sign-on"])
@pytest.mark.parametrize("pattern,seed", [("2:4", 3), ("unstructured", 13)])
def test_sign_check(pattern, seed, sign_check):
    weight, stats = make_layer(33, 256, torch.float16, seed=seed)
    cfg = dk.RefineConfig(pattern=pattern, sparsity=0.6 if pattern == "unstructured" else 0.5,
                          sign_check=sign_check)
    expected = _parity(weight, stats, cfg)
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_robust_checks(pattern):
    """improve_check + moment_check (with the layer's sequence length)."""
    weight, stats = make_layer(65, 240, torch.bfloat16, seed=4, seq=48)
    cfg = dk.RefineConfig.robust(pattern=pattern, update_threshold=0.0)
    expected = _parity(weight, stats, cfg, label=f"robust-{pattern}")
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("cycles,threshold", [(0, 0.1), (1, 0.1), (3, 0.0), (1000, 0.1), (50, 1e9)],
                         ids=["T0", "T1", "T3-tau0", "T1000", "tau-huge"])
def test_budget_and_threshold(cycles, threshold):
    weight, stats = make_layer(9, 64, torch.float32, seed=5)
    cfg = dk.RefineConfig(pattern="2:4", max_cycle_time=cycles, update_threshold=threshold, sign_check=False)
    expected = _parity(weight, stats, cfg)
    assert int(expected.swaps.max()) <= cycles


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "5:24"])
def test_given_initial_mask(pattern):
    n, m = dk.parse_pattern(pattern)
    weight, stats = make_layer(7, 240, torch.float16, seed=6)
    gen = torch.Generator().manual_seed(6)
    order = torch.rand(7, 240 // m, m, generator=gen).argsort(-1)   # random N of every M
    mask = (order < n).reshape(7, 240)
    expected = _parity(weight, stats, dk.RefineConfig(pattern=pattern), initial_mask=mask)
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
def test_init_methods(init):
    weight, stats = make_layer(33, 128, torch.float32, seed=7, hessian=init == "sparsegpt")
    expected = _parity(weight, stats, dk.RefineConfig(pattern="2:4", init=init), label=init)
    assert expected.swaps.float().mean() > 0


def test_ties_follow_the_stable_sorts():
    """Weights from four values and S = ±1, V = 1: many equal scores, exact sums."""
    gen = torch.Generator().manual_seed(8)
    values = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    weight = values[torch.randint(0, 4, (17, 64), generator=gen)]
    sign = torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0)
    stats = dk.LayerStats(sum_metric_row=sign, scaler_row=torch.ones(64), var=torch.ones(64))
    cfg = dk.RefineConfig(pattern="2:4", init="magnitude", sign_check=False, update_threshold=0.0)
    expected = _parity(weight, stats, cfg, label="ties")
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("pattern,seed", [("2:4", 9), ("unstructured", 20)])
def test_refine_backend_ext_and_auto(pattern, seed):
    """On the CPU, both patterns run on the extension, by name and by ``auto``."""
    weight, stats = make_layer(33, 128, torch.float16, seed=seed)
    cfg = dk.RefineConfig(pattern=pattern, sparsity=0.6 if pattern == "unstructured" else 0.5)
    problem, _ = build_problem(weight, stats, cfg)
    expected = refine_reference(problem)
    for backend in ("ext", "auto"):
        res = dk.refine(weight, stats, cfg, backend=backend)
        assert res.backend == "ext", f"backend={backend!r} ran {res.backend!r}"
        assert_same_output(expected, (res.pruned_mask, res.swaps, res.error_before, res.error_after), backend)
    many = dk.refine_many([weight, weight[:5]], stats, cfg, backend="ext")
    assert torch.equal(many[0].pruned_mask, expected.pruned_mask)
    assert torch.equal(many[1].pruned_mask, expected.pruned_mask[:5])
    assert dk.available_backends("cpu", pattern)["ext"] is True


# ---------------------------------------------------------------------------------------------
# Unstructured (SPEC §4) on the C++ CPU path
# ---------------------------------------------------------------------------------------------
U_SHAPES = [(7, 24), (33, 200), (64, 1000)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("rows,cols", U_SHAPES, ids=[f"O{r}-I{c}" for r, c in U_SHAPES])
def test_cpu_unstructured_matches_reference(rows, cols, sparsity, dtype):
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=rows + cols)
    expected = _parity(weight, stats, dk.RefineConfig(sparsity=sparsity), label=f"{sparsity}-{dtype}")
    assert expected.swaps.float().mean() > 0, "no swaps: the case would not test the loop"


def test_unstructured_robust_checks():
    """improve_check + moment_check (with the layer's sequence length)."""
    weight, stats = make_layer(65, 240, torch.bfloat16, seed=14, seq=48)
    cfg = dk.RefineConfig.robust(sparsity=0.6, update_threshold=0.0)
    expected = _parity(weight, stats, cfg, label="robust-unstructured")
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("cycles,threshold", [(0, 0.1), (1, 0.1), (3, 0.0), (1000, 0.1), (50, 1e9)],
                         ids=["T0", "T1", "T3-tau0", "T1000", "tau-huge"])
def test_unstructured_budget_and_threshold(cycles, threshold):
    weight, stats = make_layer(9, 300, torch.float32, seed=15)
    cfg = dk.RefineConfig(sparsity=0.6, max_cycle_time=cycles, update_threshold=threshold)
    expected = _parity(weight, stats, cfg)
    assert int(expected.swaps.max()) <= cycles


def test_unstructured_floor_guess_across_rows():
    """Rows of very different scales: the floor guessed from one row is wrong for the next,
    so both the re-collect and the buffer trimming paths of the queue selection run."""
    weight, stats = make_layer(48, 2048, torch.float32, seed=16)
    scale = torch.logspace(-3, 3, 48).unsqueeze(1)[torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    cfg = dk.RefineConfig(sparsity=0.6, max_cycle_time=100)
    expected = _parity(weight * scale, stats, cfg, label="scales")
    assert expected.swaps.float().mean() > 0


def test_unstructured_given_initial_mask():
    weight, stats = make_layer(7, 240, torch.float16, seed=17)
    gen = torch.Generator().manual_seed(17)
    mask = torch.rand(7, 240, generator=gen) < torch.linspace(0.3, 0.8, 7).unsqueeze(1)  # any count per row
    expected = _parity(weight, stats, dk.RefineConfig(sparsity=0.5), initial_mask=mask)
    assert expected.swaps.float().mean() > 0


@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
def test_unstructured_init_methods(init):
    weight, stats = make_layer(33, 128, torch.float32, seed=18, hessian=init == "sparsegpt")
    expected = _parity(weight, stats, dk.RefineConfig(sparsity=0.6, init=init), label=init)
    assert expected.swaps.float().mean() > 0


def test_unstructured_ties_follow_the_stable_sorts():
    """Weights from four values (zeros too) and S = ±1, V = 1: equal scores everywhere."""
    gen = torch.Generator().manual_seed(19)
    values = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])
    weight = values[torch.randint(0, 5, (17, 64), generator=gen)]
    sign = torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0)
    stats = dk.LayerStats(sum_metric_row=sign, scaler_row=torch.ones(64), var=torch.ones(64))
    for sparsity in (0.5, 0.6):
        cfg = dk.RefineConfig(sparsity=sparsity, init="magnitude", update_threshold=0.0)
        expected = _parity(weight, stats, cfg, label=f"ties-{sparsity}")
        assert expected.swaps.float().mean() > 0


# Known issue (seen on an H100 with torch 2.11+cu130, Python 3.12): in a build WITH the CUDA path, a
# bad argument to the binding crashes the process, even though the binding catches every C++
# exception and returns it (csrc/binding.cpp). Normal calls are unaffected, and dk.refine validates
# every input in Python before calling _C. Not reproduced without a GPU: CUDA builds against torch
# 2.11.0+cu130 and 2.14.1+cu130 (Python 3.11, nvcc 13.0) on the CPU machine pass both tests below.
# Skipped where it was seen (a CUDA build with a GPU present) so that a GPU machine's test run is
# not killed; root cause open.
CRASHES_IN_CUDA_BUILD = pytest.mark.skipif(
    ext.has_cuda() and torch.cuda.is_available(),
    reason="known issue: bad arguments crash a CUDA build of _C on a GPU machine (see the comment above)")


@CRASHES_IN_CUDA_BUILD
def test_binding_checks_name_the_tensor():
    weight, stats = make_layer(4, 16, torch.float32)
    problem, _ = build_problem(weight, stats, dk.RefineConfig(pattern="2:4"))
    args = dict(weight=problem.weight, sum_metric_row=problem.sum_metric_row,
                sqrt_scaler_row=problem.sqrt_scaler_row, var_pow=problem.var_pow,
                init_col_scale=problem.init_col_scale, init_score=None, initial_mask=None,
                prune_n=2, prune_m=4, cycles=5, threshold=0.1, sign_check=True,
                improve_check=False, moment_check=False, seq_len=1.0)
    bad = {"var_pow": torch.ones(15), "sum_metric_row": torch.ones(16, dtype=torch.float64),
           "weight": torch.ones(4, 16, dtype=torch.int32), "initial_mask": torch.ones(4, 16)}
    for name, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=name):
            ext.call("refine_nm", **{**args, name: value})
    with pytest.raises(ValueError, match="M=3"):
        ext.call("refine_nm", **{**args, "prune_n": 1, "prune_m": 3})


def test_reasons():
    assert ext.unavailable_reason(torch.device("cpu")) is None
    assert ext.unavailable_reason(torch.device("cpu"), nm=False) is None
    reason = ext.unavailable_reason(torch.device("cuda"))
    runs_here = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    assert (reason is None) == (ext.has_cuda() and runs_here), reason
    if not ext.has_cuda():
        assert "without CUDA" in reason
    reason_u = ext.unavailable_reason(torch.device("cuda"), nm=False)
    assert (reason_u is None) == ext.has_cuda_unstructured()
    if ext.has_cuda() and not ext.has_cuda_unstructured():
        assert "N:M patterns only" in reason_u
    assert dk.available_backends("cpu", "2:4")["ext"] is True


class _FakeCudaBuild:
    """Stands in for a CUDA build of ``_C`` whose probe of the current GPU answers ``code``
    (0: its kernels run there; else the CUDA error of looking them up)."""

    def __init__(self, code: int) -> None:
        self.code, self.probes = code, 0

    def has_cuda(self) -> bool:
        return True

    def has_cuda_unstructured(self) -> bool:
        return False

    def cuda_probe(self):
        self.probes += 1
        return self.code, f"error {self.code}"


@pytest.mark.parametrize("code,capability,expected,auto", [
    (209, (7, 5), "needs an sm_80 or newer GPU, not Tesla T4 (sm_75)", "triton"),
    (209, (12, 0), 'not built for Tesla T4 (sm_120): rebuild with TORCH_CUDA_ARCH_LIST="12.0"', "triton"),
    (222, (12, 0), "the NVIDIA driver cannot compile", "triton"),      # PTX newer than the driver
    (999, (9, 0), "cannot be loaded on Tesla T4 (sm_90): CUDA error 999", "triton"),
    (0, (9, 0), None, "ext"),
], ids=["pre-ampere", "not-built-for", "ptx-too-new", "other-error", "runs"])
def test_cuda_path_without_an_image_for_the_gpu(monkeypatch, code, capability, expected, auto):
    """A CUDA build whose kernels cannot be loaded on the GPU (a T4; a GPU newer than the
    build's architectures; PTX the driver cannot compile) is reported as unavailable there, so
    ``auto`` takes Triton instead of failing at launch; the probe runs once per GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    fake = _FakeCudaBuild(code)
    monkeypatch.setattr(ext, "_C", fake)
    ext._cuda_image_reason.cache_clear()
    try:
        reason = ext.unavailable_reason(torch.device("cuda:0"))
        if expected is None:
            assert reason is None, reason
            assert dk.available_backends("cuda:0", "2:4")["ext"] is True
        else:
            assert expected in reason, reason
            assert dk.available_backends("cuda:0", "2:4")["ext"] == reason
        assert fake.probes == 1                                  # asked once for this GPU
        assert "no cuda:2 here" in ext.unavailable_reason(torch.device("cuda:2"))
        if importlib.util.find_spec("triton") is not None:
            assert choose_backend("auto", torch.device("cuda:0"), nm=True) == auto
        assert fake.probes == 1
    finally:
        ext._cuda_image_reason.cache_clear()      # the real build's answers only from here on


@CRASHES_IN_CUDA_BUILD
def test_unstructured_binding_checks():
    weight, stats = make_layer(4, 16, torch.float32)
    problem, _ = build_problem(weight, stats, dk.RefineConfig(sparsity=0.5))
    args = dict(weight=problem.weight, sum_metric_row=problem.sum_metric_row,
                sqrt_scaler_row=problem.sqrt_scaler_row, var_pow=problem.var_pow,
                init_col_scale=problem.init_col_scale, init_score=None, initial_mask=None,
                pruned_per_row=8, cycles=5, threshold=0.1, sign_check=False,
                improve_check=False, moment_check=False, seq_len=1.0)
    with pytest.raises(ValueError, match="pruned_per_row"):
        ext.call("refine_unstructured", **{**args, "pruned_per_row": 17})
    with pytest.raises(ValueError, match="init_col_scale"):
        ext.call("refine_unstructured", **{**args, "init_col_scale": None})   # no score, no mask
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :8] = True                                                    # a mask needs no score
    out = ext.call("refine_unstructured", **{**args, "init_col_scale": None, "initial_mask": mask})
    assert out[0].sum(1).tolist() == [8] * 4


# ---------------------------------------------------------------------------------------------
# CUDA path (skipped without a GPU by tests/conftest.py)
# ---------------------------------------------------------------------------------------------
CUDA_SHAPES = SHAPES + [("2:4", 1, 4096), ("2:4", 130, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern,rows,cols", CUDA_SHAPES, ids=[f"O{r}-I{c}-{p}" for p, r, c in CUDA_SHAPES])
def test_cuda_matches_reference(pattern, rows, cols, dtype):
    assert ext.unavailable_reason(torch.device("cuda")) is None, ext.unavailable_reason(torch.device("cuda"))
    weight, stats = make_layer(rows, cols, DTYPES[dtype], seed=rows + cols)
    weight, stats = weight.cuda(), stats.to("cuda")
    for cfg in (dk.RefineConfig(pattern=pattern), dk.RefineConfig.robust(pattern=pattern),
                dk.RefineConfig(pattern=pattern, sign_check=False, max_cycle_time=200)):
        expected = _parity(weight, stats, cfg, label=f"cuda-{pattern}-{dtype}")
        assert expected.pruned_mask.is_cuda


@pytest.mark.gpu
def test_cuda_given_mask_sparsegpt_and_ties():
    weight, stats = make_layer(33, 256, torch.float32, seed=11, hessian=True)
    weight, stats = weight.cuda(), stats.to("cuda")
    _parity(weight, stats, dk.RefineConfig(pattern="2:4", init="sparsegpt"), label="cuda-sparsegpt")
    mask = (torch.rand(33, 64, 4, device="cuda").argsort(-1) < 2).reshape(33, 256)
    _parity(weight, stats, dk.RefineConfig(pattern="2:4"), initial_mask=mask, label="cuda-mask")
    values = torch.tensor([-0.5, -0.25, 0.25, 0.5], device="cuda")
    tied = values[torch.randint(0, 4, (65, 512), device="cuda")]
    sign = torch.where(torch.rand(512, device="cuda") < 0.5, -1.0, 1.0)
    tie_stats = dk.LayerStats(sum_metric_row=sign, scaler_row=torch.ones_like(sign), var=torch.ones_like(sign))
    cfg = dk.RefineConfig(pattern="2:4", init="magnitude", sign_check=False, update_threshold=0.0)
    _parity(tied, tie_stats, cfg, label="cuda-ties")


@pytest.mark.gpu
def test_cuda_llama_size_fp16_2_4():
    """A LLaMA-7B attention projection: 4096 x 4096 fp16, 2:4; CUDA ext == reference == CPU ext."""
    weight, stats = make_layer(4096, 4096, torch.float16, seed=12)
    cfg = dk.RefineConfig(pattern="2:4")
    on_gpu = _parity(weight.cuda(), stats.to("cuda"), cfg, label="cuda-4096")
    cpu = dk.refine(weight, stats, cfg, backend="ext")
    assert torch.equal(cpu.pruned_mask, on_gpu.pruned_mask.cpu())
    assert torch.equal(cpu.swaps, on_gpu.swaps.cpu())


@pytest.mark.gpu
def test_cuda_unstructured_explicit_only():
    """Unstructured on CUDA tensors: ext runs only if its CUDA path has it (explicit backend);
    auto keeps triton/torch first on CUDA for unstructured."""
    weight, stats = make_layer(33, 200, torch.float16, seed=21)
    weight, stats = weight.cuda(), stats.to("cuda")
    cfg = dk.RefineConfig(sparsity=0.6)
    assert dk.refine(weight, stats, cfg).backend != "ext"
    if not ext.has_cuda_unstructured():
        with pytest.raises(RuntimeError, match="N:M patterns only"):
            dk.refine(weight, stats, cfg, backend="ext")
        pytest.skip("the extension's CUDA path implements N:M only")
    _parity(weight, stats, cfg, label="cuda-unstructured")
    _parity(weight, stats, dk.RefineConfig.robust(sparsity=0.6), label="cuda-unstructured-robust")
    big, big_stats = make_layer(4096, 4096, torch.float16, seed=22)
    _parity(big.cuda(), big_stats.to("cuda"), cfg, label="cuda-unstructured-4096")

"""The ``"triton"`` backend returns exactly the reference's masks, swaps and errors.

On a machine without CUDA these run under ``TRITON_INTERPRET=1`` (set by conftest) on small,
tie-free problems; ``cap`` is lowered in some cases so that the queue threshold search (not
only the "all members fit" path) is exercised. The ``gpu``-marked tests repeat the checks at
LLaMA sizes on a CUDA device.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels.stats import _batch_partial_sums_torch

from helpers import DTYPES, assert_same_output, make_layer, non_finite_growth_layer, reference_output

pytest.importorskip("triton")
from dsnot_kernels.ops import batch_partial_sums, refine_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpret

# (out, in, pattern, sparsity, dtype, cycles, cap)
CASES = [
    (7, 24, "unstructured", 0.5, "fp32", 6, 256),
    (33, 200, "unstructured", 0.7, "fp16", 12, 16),
    (5, 1000, "unstructured", 0.5, "bf16", 10, 256),
    (6, 64, "2:4", 0.5, "fp32", 8, 256),
    (9, 96, "4:8", 0.5, "fp16", 10, 256),
    (33, 200, "2:4", 0.5, "bf16", 12, 8),
]


def _case_id(c):
    out, inn, pattern, sparsity, dtype, cycles, cap = c
    pat = f"{sparsity}" if pattern == "unstructured" else pattern
    return f"O{out}-I{inn}-{pat}-{dtype}-T{cycles}-cap{cap}"


def _layer(out, inn, dtype, seed=0, hessian=False):
    w, stats = make_layer(out, inn, DTYPES[dtype], seed=seed, hessian=hessian)
    return w.to(DEVICE), stats.to(DEVICE) if hasattr(stats, "to") else stats


def _check(w, stats, cfg, label, cap=256, initial_mask=None, want_swaps=True, **knobs):
    problem, expected = reference_output(w, stats, cfg, initial_mask)
    actual = refine_triton(problem, cap=cap, **knobs)
    assert_same_output(expected, actual, label)
    if want_swaps:
        assert float(expected.swaps.float().mean()) > 0, f"{label}: no swaps happened, the test is vacuous"
    return actual


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case):
    out, inn, pattern, sparsity, dtype, cycles, cap = case
    w, stats = _layer(out, inn, dtype)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, max_cycle_time=cycles,
                          update_threshold=0.01)
    _check(w, stats, cfg, _case_id(case), cap=cap)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("sign_check", [False, True], ids=["sign-off", "sign-on"])
def test_sign_check_flag(pattern, sign_check):
    w, stats = _layer(12, 128, "fp32", seed=1)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=10, sign_check=sign_check,
                          update_threshold=0.01)
    _check(w, stats, cfg, f"{pattern}-sign{sign_check}")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_robust_checks(pattern):
    w, stats = _layer(16, 128, "fp16", seed=2)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=10, improve_check=True,
                          moment_check=True, update_threshold=0.01)
    _check(w, stats, cfg, f"{pattern}-robust", want_swaps=False)


@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
@pytest.mark.parametrize("select", ["rows", "stream"])
def test_given_initial_mask(pattern, select):
    w, stats = _layer(10, 64, "fp32", seed=3)
    gen = torch.Generator().manual_seed(3)
    if pattern == "unstructured":
        mask = torch.rand(10, 64, generator=gen) < 0.6
    else:
        order = torch.rand(10, 8, 8, generator=gen).argsort(-1)
        mask = (order < 4).reshape(10, 64)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=8, update_threshold=0.01)
    _check(w, stats, cfg, f"{pattern}-given-mask-{select}", initial_mask=mask.to(DEVICE), select=select,
           chunk=16)


@pytest.mark.parametrize("init,pattern", [("magnitude", "unstructured"), ("magnitude", "2:4"),
                                          ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")])
@pytest.mark.parametrize("select", ["rows", "stream"])
def test_init_methods(init, pattern, select):
    w, stats = _layer(8, 64, "fp32", seed=4, hessian=init == "sparsegpt")
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, init=init, max_cycle_time=8,
                          update_threshold=0.01)
    _check(w, stats, cfg, f"{init}-{pattern}-{select}", select=select, chunk=32)


@pytest.mark.parametrize("pattern,init,cap", [("unstructured", "wanda", 8), ("unstructured", "magnitude", 256),
                                              ("2:4", "magnitude", 8)],
                         ids=["unstructured-wanda-cap8", "unstructured-magnitude", "2:4-magnitude-cap8"])
@pytest.mark.parametrize("select", ["rows", "stream"])
@pytest.mark.parametrize("queue_search", ["joint", "serial"])
def test_heavy_ties(pattern, init, cap, select, queue_search):
    """Few distinct weights and column factors: scores tie in whole blocks, so the selections
    must fall back to the column order (the int64 key rule) inside a tie block (cap 8: inside
    a queue's tie block; the magnitude case: inside the initial mask's)."""
    gen = torch.Generator().manual_seed(8)
    out, inn = 12, 160
    w = (torch.randint(-6, 7, (out, inn), generator=gen).float() / 4).to(DEVICE)
    sign = torch.where(torch.arange(inn) % 3 == 0, -1.0, 1.0)
    stats = dk.LayerStats(sum_metric_row=sign * 2.0, scaler_row=torch.full((inn,), 9.0),
                          var=torch.where(torch.arange(inn) % 5 == 0, 0.5, 2.0), nsamples=4,
                          ntokens=128).to(DEVICE)
    cfg = dk.RefineConfig(sparsity=0.55, pattern=pattern, init=init, max_cycle_time=20,
                          update_threshold=0.01)
    _check(w, stats, cfg, f"ties-{pattern}-{init}-{select}-{queue_search}", cap=cap, select=select,
           chunk=64, queue_search=queue_search)


@pytest.mark.parametrize("select", ["rows", "stream"])
@pytest.mark.parametrize("queue_search", ["joint", "serial"])
def test_ties_in_every_queue(select, queue_search):
    """Weights +-1 and column sums +-1: every queue's keys are all equal and each queue holds
    more than ``cap`` members, so all four queues split their tie blocks by column at once (in
    the same lockstep loop for the joint search)."""
    gen = torch.Generator().manual_seed(11)
    out, inn = 6, 96
    w = torch.where(torch.rand(out, inn, generator=gen) < 0.5, -1.0, 1.0).to(DEVICE)
    stats = dk.LayerStats(sum_metric_row=torch.where(torch.rand(inn, generator=gen) < 0.5, -1.0, 1.0),
                          scaler_row=torch.full((inn,), 4.0), var=torch.ones(inn), nsamples=4,
                          ntokens=128).to(DEVICE)
    cfg = dk.RefineConfig(sparsity=0.5, max_cycle_time=9, update_threshold=0.0)
    _check(w, stats, cfg, f"ties-everywhere-{select}-{queue_search}", cap=8, select=select, chunk=32,
           queue_search=queue_search)


@pytest.mark.parametrize("launch", [dict(select="stream", chunk=16), dict(select="stream", chunk=64),
                                    dict(select="rows", row_programs_per_sm=1)],
                         ids=["stream-chunk16", "stream-chunk64", "rows-seeded"])
def test_kth_seed_across_rows(launch):
    """The streamed kernel (and the row kernel with ``row_programs_per_sm``) seeds each row's
    k-th search from the previous row of its program (scaled by the rows' mean scores). Seeds
    are only probes, so rows that break the prediction must still come out exact: scales over
    six decades, an all-zero row (mean score 0), a row of equal weights (one tie block: the
    tie split by column), a row with one huge weight; 3 programs under the interpreter, so
    each program sees ~10 consecutive rows."""
    gen = torch.Generator().manual_seed(21)
    out, inn = 30, 150
    w = torch.randn(out, inn, generator=gen) * torch.logspace(-3, 3, out)[torch.randperm(out, generator=gen)][:, None]
    w[4] = 0.0
    w[7] = 0.5
    w[11, 3] = 1e4
    _, stats = _layer(out, inn, "fp32", seed=21)
    cfg = dk.RefineConfig(sparsity=0.6, max_cycle_time=12, update_threshold=0.0)
    for cap in (8, 256):
        _check(w.to(DEVICE), stats, cfg, f"seeded-kth-{launch}-cap{cap}", cap=cap, **launch)


@pytest.mark.parametrize("pattern,sparsity", [("1:2", 0.5), ("unstructured", 0.5)])
@pytest.mark.parametrize("queue_search", ["joint", "serial"])
def test_two_column_rows(pattern, sparsity, queue_search):
    """Rows of two columns: the streamed kernel's chunk (and its stats tile) shrink to the row."""
    w, stats = _layer(3, 2, "fp32", seed=3)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, max_cycle_time=3, update_threshold=0.0)
    for select in ("auto", "stream"):
        _check(w, stats, cfg, f"{pattern}-2-cols-{select}-{queue_search}", cap=8, select=select,
               queue_search=queue_search, want_swaps=False)


@pytest.mark.parametrize("select,chunk,queue_search", [("rows", 1024, "joint"), ("stream", 32, "joint"),
                                                       ("stream", 64, "joint"), ("rows", 1024, "serial"),
                                                       ("stream", 32, "serial")])
@pytest.mark.parametrize("pattern,sparsity,cap", [("unstructured", 0.6, 256), ("unstructured", 0.5, 16),
                                                  ("2:4", 0.5, 256), ("4:8", 0.5, 32)])
def test_both_select_kernels(select, chunk, queue_search, pattern, sparsity, cap):
    """``select="auto"`` uses one kernel per pattern/width; both must equal the reference for
    every pattern, with either queue search. Chunks smaller than the row (and rows > programs,
    under the interpreter: 3 programs) exercise the streamed kernel's loops and its reuse of
    scratch across rows."""
    w, stats = _layer(11, 72, "fp16", seed=5)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, update_threshold=0.01)
    _check(w, stats, cfg, f"{select}-{chunk}-{queue_search}-{pattern}-{sparsity}-{cap}", cap=cap,
           select=select, chunk=chunk, queue_search=queue_search)


@pytest.mark.parametrize("pattern,given_mask", [("4:8", False), ("unstructured", True), ("unstructured", False)])
def test_persistent_row_kernel(pattern, given_mask):
    """``row_programs_per_sm``: row-kernel programs that loop over the rows with a seeded k-th
    search (unstructured rows without a given mask; N:M and given masks keep one program per row)."""
    w, stats = _layer(11, 64, "bf16", seed=9)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=8, update_threshold=0.01)
    mask = None
    if given_mask:
        mask = (torch.rand(11, 64, generator=torch.Generator().manual_seed(2)) < 0.4).to(DEVICE)
    _check(w, stats, cfg, f"persistent-rows-{pattern}-{given_mask}", cap=16, initial_mask=mask,
           select="rows", row_programs_per_sm=2)
    problem, _ = dk.build_problem(w, stats, cfg)
    with pytest.raises(ValueError, match="row_programs_per_sm"):
        refine_triton(problem, row_programs_per_sm=-1)


@pytest.mark.parametrize("select", ["rows", "stream"])
def test_zero_cycles_and_zero_sparsity(select):
    w, stats = _layer(4, 48, "fp32", seed=5)
    _check(w, stats, dk.RefineConfig(sparsity=0.5, max_cycle_time=0), "T0", want_swaps=False,
           select=select, chunk=16)
    _check(w, stats, dk.RefineConfig(sparsity=0.0, max_cycle_time=4), "s0", want_swaps=False,
           select=select, chunk=16)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refine_api_and_refine_many(pattern):
    stats = _layer(1, 64, "fp32", seed=6)[1]
    layers = [_layer(n, 64, "fp32", seed=10 + n)[0] for n in (3, 5, 2)]
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=6, update_threshold=0.01)
    many = dk.refine_many(layers, stats, cfg, backend="triton")
    for i, (layer, got) in enumerate(zip(layers, many)):
        single = dk.refine(layer, stats, cfg, backend="triton")
        ref = dk.refine(layer, stats, cfg, backend="reference")
        assert got.backend == single.backend == "triton"
        assert_same_output((ref.pruned_mask, ref.swaps, ref.error_before, ref.error_after),
                           (got.pruned_mask, got.swaps, got.error_before, got.error_after),
                           f"refine_many[{i}]")
        assert torch.equal(single.pruned_mask, got.pruned_mask) and torch.equal(single.swaps, got.swaps)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 300, 70)], ids=lambda s: "x".join(map(str, s)))
def test_batch_partial_sums(shape, dtype):
    gen = torch.Generator().manual_seed(7)
    width = shape[2]
    x = (torch.randn(*shape, generator=gen) * (torch.rand(width, generator=gen) + 0.1)
         + 3.0 * torch.randn(width, generator=gen)).to(DTYPES[dtype]).to(DEVICE)
    expected = _batch_partial_sums_torch(x)
    actual = batch_partial_sums(x)
    for name, e, a in zip(("sum", "sumsq", "m2"), expected, actual):
        assert a.dtype == torch.float64 and a.shape == (width,)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="problem"):
        refine_triton("not a problem")
    w, stats = _layer(2, 16, "fp32")
    problem, _ = dk.build_problem(w, stats, dk.RefineConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="queue_search"):
        refine_triton(problem, queue_search="fast")
    wide, wide_stats = _layer(1, 65536, "fp32")
    wide_problem, _ = dk.build_problem(wide, wide_stats, dk.RefineConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="65535 columns"):
        refine_triton(wide_problem, queue_search="joint")
    # auto: joint up to the 16-bit count fields' limit, serial beyond
    from dsnot_kernels.ops.refine import _joint_search
    assert _joint_search("auto", 65535) and not _joint_search("auto", 65536)
    assert not _joint_search("serial", 4096) and _joint_search("joint", 4096)
    with pytest.raises(ValueError, match=r"\[batch, seq, in\]"):
        batch_partial_sums(torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(TypeError, match="float16"):
        batch_partial_sums(torch.zeros(1, 4, 4, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("select", ["rows", "stream"])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_non_finite_growth_scores(pattern, select):
    """G = +-inf and NaN (zero-variance channels, p = 4): the kernels agree with the reference."""
    w, stats, cfg = non_finite_growth_layer(pattern)
    _check(w.to(DEVICE), stats.to(DEVICE), cfg, f"{pattern}-non-finite-G-{select}", select=select, chunk=16)


@pytest.mark.parametrize("pattern,init,sparsity", [("unstructured", "wanda", 0.25),
                                                    ("unstructured", "magnitude", 0.5), ("2:4", "wanda", 0.5)])
@pytest.mark.parametrize("select", ["rows", "stream"])
def test_signed_zeros(pattern, init, sparsity, select):
    """-0.0 weights and -0.0 means of squares. The kernels read ``|w| * sqrt(Q)`` (Wanda's
    initial score and the prune queues' ``A``) by its float bits, which order like the float
    only if it is never -0.0: the host makes ``sqrt(-0.0)`` +0.0. Half of the zero-score
    columns here have ``Q = -0.0``; they must tie with the others by column, as in the
    reference's stable sort, both at the initial mask's ``k``-th score (Wanda, 25%: the
    threshold falls inside the block of zero scores) and at the head of the prune queues
    (magnitude init keeps zero-``A`` weights)."""
    w, stats = make_layer(12, 64, torch.float32, seed=5)
    w[:, 3::7] = -0.0
    q = stats.scaler_row.clone()
    q[1::4] = -0.0
    q[2::4] = 0.0
    stats = dataclasses.replace(stats, scaler_row=q)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern, init=init, max_cycle_time=12)
    _check(w.to(DEVICE), stats.to(DEVICE), cfg, f"{pattern}-{init}-signed-zeros-{select}", cap=8,
           select=select, chunk=16)


@pytest.mark.parametrize("gpu,optin,unstructured_max,nm_max",
                         [("H200", 232448, 4096, 8192), ("A100", 166912, 4096, 8192),
                          ("RTX 4090", 101376, 2048, 4096)])
def test_cycle_limit_from_shared_memory(monkeypatch, gpu, optin, unstructured_max, nm_max):
    """The select kernels sort ``[NQ, CAP]`` int64 keys in shared memory (NQ*CAP*8 bytes, the
    AOT compile test checks that figure): deeper queues than a GPU's per-block shared memory
    holds are refused with the largest ``max_cycle_time`` that fits, before any launch."""
    from dsnot_kernels.ops import refine as launcher
    monkeypatch.setattr(launcher, "_shared_memory_per_block", lambda device: optin)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    cuda = torch.device("cuda")
    for nm, most in ((False, unstructured_max), (True, nm_max)):
        assert launcher.limit_reason(50, 4096, nm, cuda) is None
        assert launcher.limit_reason(most, 16384, nm, cuda) is None
        reason = launcher.limit_reason(most + 1, 16384, nm, cuda)
        assert reason is not None and f"max_cycle_time <= {most}" in reason and gpu in reason, reason
        # a row narrower than the queue depth caps the depth: then any max_cycle_time fits
        assert launcher.limit_reason(10 ** 6, most, nm, cuda) is None
    assert launcher.limit_reason(10 ** 6, 16384, False, torch.device("cpu")) is None   # interpreter


def test_launch_fits_amd_gpus(monkeypatch):
    """A ROCm torch calls an AMD GPU a "cuda" device, and Triton runs its 64-lane wavefronts as
    warps. The launcher must then keep a program within 1024 threads (16 warps: the row kernel
    takes 32 of NVIDIA's for 16384-wide rows), pass no ``maxnreg`` (Triton's AMD backend has
    none: the launch raises KeyError) and give each streamed key one owner (chunk >= threads).
    The kernels compile for gfx942 (test_triton_compile.py) but have never run on an AMD GPU."""
    from types import SimpleNamespace
    from dsnot_kernels.ops import refine as launcher
    cuda = torch.device("cuda")
    assert launcher.warp_size(torch.device("cpu")) == 32
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(warp_size=64))
    assert launcher.warp_size(cuda) == 64
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace())
    assert launcher.warp_size(cuda) == 32          # an older torch without the field: NVIDIA's
    assert [launcher._num_warps(b, False, 32) for b in (1024, 4096, 16384)] == [4, 8, 32]
    assert [launcher._num_warps(b, False, 64) for b in (1024, 4096, 16384)] == [4, 8, 16]
    assert launcher.stream_chunk(16, 4096, 1, 4 * 64) == 256       # one owner per key
    assert launcher.stream_chunk(1000, 4096, 1, 4 * 64) == 1024
    assert launcher.stream_chunk(4096, 100, 1, 0) == 128           # at most the padded row
    assert launcher.stream_chunk(16, 4096, 64, 0) == 64            # at least one N:M group
    monkeypatch.setattr(launcher, "INTERPRET", False)
    assert launcher.launch_options(4, capped=True)["maxnreg"] == launcher.STREAM_MAXNREG
    assert "maxnreg" not in launcher.launch_options(4, capped=False)
    monkeypatch.setattr(launcher, "REGISTER_CAP_OPTION", False)     # as on a ROCm torch
    assert launcher.launch_options(4, capped=True) == {"num_warps": 4, "enable_fp_fusion": False}
    monkeypatch.setattr(launcher, "INTERPRET", True)
    monkeypatch.setattr(launcher, "warp_size", lambda device: 64)
    weight, stats = make_layer(2, 64, torch.float32, seed=0)
    problem, _ = dk.build_problem(weight, stats, dk.RefineConfig())
    with pytest.raises(ValueError, match="num_warps=32 exceeds 1024 threads .* at most 16"):
        launcher.refine_triton(problem, num_warps=32)


def test_groups_too_wide_for_triton():
    """N:M groups wider than TRITON_MAX_GROUP (64) are refused before any launch, by
    available_backends too (the driver checks it before any work); auto takes another backend."""
    from dsnot_kernels.api import build_problem
    from dsnot_kernels.backends import choose_backend
    from dsnot_kernels.ops import refine as launcher
    cpu = torch.device("cpu")
    assert launcher.limit_reason(50, 4096, True, cpu, m=64) is None
    reason = launcher.limit_reason(50, 4096, True, cpu, m=128)
    assert reason is not None and "M > 64" in reason and "M=128" in reason
    assert dk.available_backends("cpu", "32:64")["triton"] is True
    assert "M > 64" in dk.available_backends("cpu", "1:128")["triton"]
    weight, stats = make_layer(2, 128, torch.float32, seed=0)
    problem, _ = build_problem(weight, stats, dk.RefineConfig(pattern="1:128"))
    with pytest.raises(RuntimeError, match="M > 64"):
        choose_backend("triton", cpu, True, problem)
    assert choose_backend("auto", cpu, True, problem) != "triton"


def test_too_many_cycles_for_triton(monkeypatch):
    """Beyond the 16-bit queue counts (any device): the launcher and an explicit
    ``backend="triton"`` refuse with the reason, ``auto`` on a GPU takes the torch backend."""
    from dsnot_kernels import backends
    w, stats = _layer(1, 65536, "fp32")
    cfg = dk.RefineConfig(sparsity=0.5, max_cycle_time=40000)
    problem, _ = dk.build_problem(w, stats, cfg)
    with pytest.raises(ValueError, match="max_cycle_time=40000 is too large"):
        refine_triton(problem)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: max_cycle_time=40000"):
        backends.choose_backend("triton", problem.weight.device, False, problem)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device, nm: None)
    assert backends.choose_backend("auto", torch.device("cuda"), False, problem) == "torch"
    small, _ = dk.build_problem(w, stats, dk.RefineConfig(sparsity=0.5))
    assert backends.choose_backend("auto", torch.device("cuda"), False, small) == "triton"


def _interpreted_launches(problem) -> list:
    """The tuning candidates of ``problem`` that differ under the interpreter, where warps and
    programs per SM do not apply (3 programs always)."""
    from dsnot_kernels.ops.launch_tuning import candidates
    launches = []
    for knobs in candidates(problem):
        knobs = {k: v for k, v in knobs.items() if k not in ("num_warps", "programs_per_sm")}
        if knobs not in launches:
            launches.append(knobs)
    return launches


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the gpu-marked test_gpu_llama_sizes covers this on CUDA")
@pytest.mark.parametrize("pattern,sparsity,rows,inn", [("unstructured", 0.6, 2, 4096), ("unstructured", 0.6, 1, 11008),
                                                     ("2:4", 0.5, 2, 4096), ("2:4", 0.5, 2, 11008)],
                         ids=["60%-I4096", "60%-I11008", "2:4-I4096", "2:4-I11008"])
def test_llama_width_rows_every_launch(pattern, sparsity, rows, inn):
    """Rows as wide as LLaMA-7B's, at the published defaults (T=50, τ=0.1, the default
    ``cap``/``chunk``), through every launch ``auto`` may pick on a GPU: the small shapes
    above loop over chunks only when given chunks of 16-64 columns, and never meet a
    4096/16384-wide row tile or queues of thousands of candidates for T=50. (Seeds across rows
    are tested at small widths above: under the interpreter a wide row costs seconds per
    launch.)"""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(rows, inn, generator=gen) * 0.02).to(torch.float16)
    x = (torch.randn(2, 64, inn, generator=gen) * (torch.rand(inn, generator=gen) + 0.25)
         + 0.5 * torch.randn(inn, generator=gen))
    acc = dk.StatsAccumulator(inn)
    acc.update(x)
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)
    problem, expected = reference_output(w, acc.finalize(), cfg)
    assert problem.cycles == 50 and float(expected.swaps.float().mean()) > 0
    launches = _interpreted_launches(problem)
    assert {k["select"] for k in launches} == {"rows", "stream"}, launches
    for knobs in launches:
        assert_same_output(expected, refine_triton(problem, **knobs), f"{rows}x{inn}-{pattern}-{knobs}")


# ------------------------------------------------------------------------------------------------
# GPU: the same parity at LLaMA sizes (a subset of rows checked against the reference)
# ------------------------------------------------------------------------------------------------
GPU_KNOBS = [{}, {"select": "rows", "queue_search": "serial"}, {"select": "stream", "queue_search": "serial"},
             {"select": "rows", "queue_search": "joint"}, {"select": "stream", "queue_search": "joint"},
             {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 16},
             {"select": "rows", "row_programs_per_sm": 1}]


@pytest.mark.gpu
@pytest.mark.parametrize("out,inn,knobs", [(4096, 4096, k) for k in GPU_KNOBS] + [(11008, 4096, {}), (4096, 11008, {})],
                         ids=lambda v: "-".join(map(str, v.values())) or "auto" if isinstance(v, dict) else str(v))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpu_llama_sizes(out, inn, knobs, pattern):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out, inn, generator=gen) * 0.02).to(torch.float16).cuda()
    x = (torch.randn(8, 128, inn, generator=gen) * (torch.rand(inn, generator=gen) + 0.25)
         + 0.5 * torch.randn(inn, generator=gen)).cuda()
    acc = dk.StatsAccumulator(inn)
    acc.update(x)
    stats = acc.finalize()
    cfg = dk.RefineConfig(sparsity=0.6, pattern=pattern)
    problem, _ = dk.build_problem(w, stats, cfg)
    got = refine_triton(problem, **knobs)
    rows = torch.randperm(out, generator=gen)[:512].sort().values.cuda()
    sub = dk.RefineConfig(sparsity=0.6, pattern=pattern)
    sub_problem, expected = reference_output(w[rows], stats, sub)
    assert_same_output(expected, tuple(t[rows] for t in got), f"{out}x{inn}-{pattern}")
    assert float(got.swaps.float().mean()) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_gpu_stats_kernel(dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 2048, 4096, generator=gen) + torch.randn(4096, generator=gen)).to(DTYPES[dtype]).cuda()
    for name, e, a in zip(("sum", "sumsq", "m2"), _batch_partial_sums_torch(x), batch_partial_sums(x)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpu_deepest_queue_that_fits(pattern):
    """The deepest ``max_cycle_time`` that ``limit_reason`` admits on this GPU launches and
    equals the reference; one power of two deeper is refused before any launch."""
    from dsnot_kernels.ops.refine import limit_reason
    nm = pattern != "unstructured"
    most = next(t for t in (16384, 8192, 4096, 2048, 1024)
                if limit_reason(t, 16384, nm, torch.device("cuda")) is None)
    assert limit_reason(2 * most, 16384, nm, torch.device("cuda")) is not None
    w, stats = _layer(8, most, "fp16", seed=5)            # queues as deep as the row: CAP = most
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=most, update_threshold=0.0)
    _check(w, stats, cfg, f"{pattern}-T{most}")

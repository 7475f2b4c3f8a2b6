"""The public API contract of DESIGN.md: defaults, bad input, backends, apply_mask_, refine_many.

Bad input (DESIGN.md, correctness rule 3) must raise ``ValueError``/``TypeError`` whose message
names the offending argument; an explicitly requested backend that cannot run raises
``RuntimeError`` with the reason, never a silent fallback.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import dsnot_kernels as dk
from dsnot_kernels.reference import initial_mask_from_score
from helpers import make_layer

ROWS, COLS = 6, 32


@pytest.fixture(scope="module")
def layer():
    return make_layer(ROWS, COLS, torch.float32, seed=1, hessian=True)


def outputs(res):
    return res.pruned_mask, res.swaps, res.error_before, res.error_after


def assert_same_result(a, b, label=""):
    assert torch.equal(a.pruned_mask, b.pruned_mask), label
    assert torch.equal(a.swaps, b.swaps), label
    assert torch.equal(a.error_before, b.error_before), label
    assert torch.equal(a.error_after, b.error_after), label


# ---- bad input: (weight, stats, cfg, initial_mask) -> exception naming the argument ------------
def _with(stats, **fields):
    return replace(stats, **fields)


def _nan_at(t, value=math.nan):
    t = t.clone()
    t.view(-1)[1] = value
    return t


BAD_INPUTS = {
    # wrong shapes
    "weight-1d": (lambda w, s: (w[0], s, None, None), ValueError, "layer"),
    "weight-3d": (lambda w, s: (w.unsqueeze(0), s, None, None), ValueError, "layer"),
    "sum_metric_row-shape": (lambda w, s: (w, _with(s, sum_metric_row=s.sum_metric_row[:-1]), None, None),
                             ValueError, "stats.sum_metric_row"),
    "scaler_row-shape": (lambda w, s: (w, _with(s, scaler_row=s.scaler_row.repeat(2)), None, None),
                         ValueError, "stats.scaler_row"),
    "var-shape": (lambda w, s: (w, _with(s, var=s.var.view(1, -1)), None, None), ValueError, "stats.var"),
    "stats-for-other-layer": (lambda w, s: (w[:, :16], s, None, None), ValueError, "stats.sum_metric_row"),
    # pattern
    "M-does-not-divide-in": (lambda w, s: (w[:, :30], _with(s, sum_metric_row=s.sum_metric_row[:30],
                                                           scaler_row=s.scaler_row[:30], var=s.var[:30],
                                                           hessian=None),
                                           dk.RefineConfig(pattern="4:8"), None), ValueError, "pattern"),
    "pattern-garbage": (lambda w, s: (w, s, _changed_cfg(pattern="2-4"), None), ValueError, "pattern"),
    "pattern-N>=M": (lambda w, s: (w, s, _changed_cfg(pattern="4:4"), None), ValueError, "pattern"),
    "pattern-N=0": (lambda w, s: (w, s, _changed_cfg(pattern="0:4"), None), ValueError, "pattern"),
    "pattern-not-str": (lambda w, s: (w, s, _changed_cfg(pattern=24), None), TypeError, "pattern"),
    # sparsity outside [0, 1)
    "sparsity-negative": (lambda w, s: (w, s, _changed_cfg(sparsity=-0.1), None), ValueError, "sparsity"),
    "sparsity-one": (lambda w, s: (w, s, _changed_cfg(sparsity=1.0), None), ValueError, "sparsity"),
    "sparsity-above-one": (lambda w, s: (w, s, _changed_cfg(sparsity=1.5), None), ValueError, "sparsity"),
    "sparsity-nan": (lambda w, s: (w, s, _changed_cfg(sparsity=math.nan), None), ValueError, "sparsity"),
    "sparsity-str": (lambda w, s: (w, s, _changed_cfg(sparsity="0.5"), None), TypeError, "sparsity"),
    "sparsity-bool": (lambda w, s: (w, s, _changed_cfg(sparsity=True), None), TypeError, "sparsity"),
    # NaN / inf
    "weight-nan": (lambda w, s: (_nan_at(w), s, None, None), ValueError, "layer"),
    "weight-inf": (lambda w, s: (_nan_at(w, math.inf), s, None, None), ValueError, "layer"),
    "sum_metric_row-nan": (lambda w, s: (w, _with(s, sum_metric_row=_nan_at(s.sum_metric_row)), None, None),
                           ValueError, "stats.sum_metric_row"),
    # float64 statistics that fit float64 but not float32, where the backends compute (inf there)
    "scaler_row-beyond-float32": (lambda w, s: (w, _with(s, scaler_row=_nan_at(s.scaler_row.double(), 1e300)),
                                                None, None), ValueError, "stats.scaler_row holds values beyond"),
    "sum_metric_row-beyond-float32": (lambda w, s: (w, _with(s, sum_metric_row=_nan_at(s.sum_metric_row.double(),
                                                                                        -1e40)),
                                                    None, None), ValueError, "stats.sum_metric_row holds values"),
    "scaler_row-inf": (lambda w, s: (w, _with(s, scaler_row=_nan_at(s.scaler_row, math.inf)), None, None),
                       ValueError, "stats.scaler_row"),
    "var-nan": (lambda w, s: (w, _with(s, var=_nan_at(s.var)), None, None), ValueError, "stats.var"),
    "var-negative-inf": (lambda w, s: (w, _with(s, var=_nan_at(s.var, -math.inf)), None, None),
                         ValueError, "stats.var"),
    "hessian-nan": (lambda w, s: (w, _with(s, hessian=_nan_at(s.hessian)), dk.RefineConfig(init="sparsegpt"),
                                  None), ValueError, "stats.hessian"),
    "scaler_row-negative": (lambda w, s: (w, _with(s, scaler_row=-s.scaler_row), None, None),
                            ValueError, "stats.scaler_row"),
    # mismatched devices (the "meta" device stands in for a GPU)
    "sum_metric_row-device": (lambda w, s: (w, _with(s, sum_metric_row=s.sum_metric_row.to("meta")), None, None),
                              ValueError, "stats.sum_metric_row"),
    "var-device": (lambda w, s: (w, _with(s, var=s.var.to("meta")), None, None), ValueError, "stats.var"),
    "hessian-device": (lambda w, s: (w, _with(s, hessian=s.hessian.to("meta")),
                                     dk.RefineConfig(init="sparsegpt"), None), ValueError, "stats.hessian"),
    "initial_mask-device": (lambda w, s: (w, s, None, torch.zeros(ROWS, COLS, dtype=torch.bool, device="meta")),
                            ValueError, "initial_mask"),
    # dtypes
    "weight-float64": (lambda w, s: (w.double(), s, None, None), TypeError, "layer"),
    "weight-int": (lambda w, s: (w.to(torch.int32), s, None, None), TypeError, "layer"),
    "stats-int": (lambda w, s: (w, _with(s, var=s.var.to(torch.int64)), None, None), TypeError, "stats.var"),
    "stats-list": (lambda w, s: (w, _with(s, scaler_row=s.scaler_row.tolist()), None, None),
                   TypeError, "stats.scaler_row"),
    # initial_mask
    "initial_mask-uint8": (lambda w, s: (w, s, None, torch.zeros(ROWS, COLS, dtype=torch.uint8)),
                           TypeError, "initial_mask"),
    "initial_mask-shape": (lambda w, s: (w, s, None, torch.zeros(ROWS, COLS + 1, dtype=torch.bool)),
                           ValueError, "initial_mask"),
    "initial_mask-nm-count": (lambda w, s: (w, s, dk.RefineConfig(pattern="2:4"),
                                            torch.zeros(ROWS, COLS, dtype=torch.bool)), ValueError, "initial_mask"),
    # sparsegpt
    "sparsegpt-without-hessian": (lambda w, s: (w, _with(s, hessian=None), dk.RefineConfig(init="sparsegpt"), None),
                                  ValueError, "hessian"),
    "sparsegpt-hessian-shape": (lambda w, s: (w, _with(s, hessian=s.hessian[:-1]),
                                              dk.RefineConfig(init="sparsegpt"), None), ValueError, "stats.hessian"),
    # wrong types of the arguments themselves
    "layer-not-linear": (lambda w, s: (nn.ReLU(), s, None, None), TypeError, "layer"),
    # a module with a 2-D weight that need not be [out, in] (an Embedding's is [vocab, dim])
    "layer-embedding": (lambda w, s: (nn.Embedding(ROWS, COLS), s, None, None), TypeError, "Embedding module"),
    "layer-list": (lambda w, s: (w.tolist(), s, None, None), TypeError, "layer"),
    "stats-dict": (lambda w, s: (w, s.__dict__, None, None), TypeError, "stats"),
    "cfg-dict": (lambda w, s: (w, s, {"sparsity": 0.5}, None), TypeError, "cfg"),
    "nsamples-zero": (lambda w, s: (w, _with(s, nsamples=0), None, None), ValueError, "nsamples"),
    "nsamples-bool": (lambda w, s: (w, _with(s, nsamples=True), None, None), ValueError, "nsamples"),
    # LayerStats' defaults are nsamples=ntokens=1: a sample count alone leaves fewer tokens
    "ntokens-below-nsamples": (lambda w, s: (w, _with(s, nsamples=16, ntokens=8), None, None), ValueError,
                               "ntokens >= nsamples"),
    "weight-no-columns": (lambda w, s: (w[:, :0], s, None, None), ValueError, "at least one input column"),
    "weight-meta": (lambda w, s: (w.to("meta"), s, None, None), ValueError, "meta device"),
    "init-unknown": (lambda w, s: (w, s, _changed_cfg(init="random"), None), ValueError, "init"),
}


def _changed_cfg(**fields) -> dk.RefineConfig:
    """A valid config whose fields are then set to (bad) values: ``refine`` must still refuse
    them (``RefineConfig(...)`` itself refuses them at construction: test_config_validate)."""
    cfg = dk.RefineConfig()
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(layer, case):
    make, exc, name = BAD_INPUTS[case]
    weight, stats = layer
    args = make(weight, stats)
    with pytest.raises(exc) as info:
        dk.refine(args[0], args[1], args[2], backend="reference", initial_mask=args[3])
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"
    # refine_many reports the same
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        dk.refine_many([args[0]], args[1], args[2], backend="reference",
                       initial_masks=None if args[3] is None else [args[3]])


def test_unknown_backend_name(layer):
    weight, stats = layer
    with pytest.raises(ValueError, match="backend"):
        dk.refine(weight, stats, backend="cuda")


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, exc, name", [
    (dict(init="random"), ValueError, "init"),
    (dict(max_cycle_time=-1), ValueError, "max_cycle_time"),
    (dict(max_cycle_time=2.5), ValueError, "max_cycle_time"),
    (dict(max_cycle_time=True), ValueError, "max_cycle_time"),
    (dict(update_threshold=-0.1), ValueError, "update_threshold"),
    (dict(update_threshold=math.inf), ValueError, "update_threshold"),
    (dict(pow_of_var_regrowing=math.nan), ValueError, "pow_of_var_regrowing"),
    (dict(sign_check="yes"), TypeError, "sign_check"),
    (dict(improve_check=1), TypeError, "improve_check"),
    (dict(moment_check=None), TypeError, "moment_check"),
    (dict(cycle_fraction=1.5), ValueError, "cycle_fraction"),
    (dict(cycle_fraction=-0.5), ValueError, "cycle_fraction"),
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(pattern="2:4:8"), ValueError, "pattern"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_config_validate(fields, exc, name):
    with pytest.raises(exc, match=name):
        dk.RefineConfig(**fields)                     # refused where it is built
    with pytest.raises(exc, match=name):
        _changed_cfg(**fields).validate()             # and when a field is changed afterwards


def test_config_valid_and_derived():
    cfg = dk.RefineConfig().validate()
    assert (cfg.sparsity, cfg.pattern, cfg.init) == (0.5, "unstructured", "wanda")
    assert (cfg.max_cycle_time, cfg.update_threshold, cfg.pow_of_var_regrowing) == (50, 0.1, 1.0)
    assert cfg.resolved_sign_check() is False
    assert dk.RefineConfig(pattern="2:4").resolved_sign_check() is True
    assert dk.RefineConfig(pattern="2:4", sign_check=False).resolved_sign_check() is False
    assert dk.RefineConfig(pattern=" 3 : 8 ").nm == (3, 8)
    assert dk.RefineConfig(sparsity=0.57).pruned_per_row(100) == 57     # no binary-rounding loss
    assert dk.RefineConfig(pattern="2:4").pruned_per_row(32) == 16
    assert dk.RefineConfig(cycle_fraction=0.1).cycles_for(200) == 10    # floor(0.1 * 100)
    assert dk.RefineConfig(cycle_fraction=1.0).cycles_for(400) == 50    # capped by max_cycle_time


def test_presets():
    assert dk.RefineConfig.preset("original") == dk.RefineConfig()
    assert dk.RefineConfig.original() == dk.RefineConfig()
    robust = dk.RefineConfig.preset("robust")
    assert robust.improve_check and robust.moment_check
    assert replace(robust, improve_check=False, moment_check=False) == dk.RefineConfig()
    assert dk.RefineConfig.robust(sparsity=0.7, moment_check=False).sparsity == 0.7
    assert dk.RefineConfig.robust(moment_check=False).moment_check is False
    with pytest.raises(ValueError, match="preset"):
        dk.RefineConfig.preset("fast")


# ---- defaults and the layer -------------------------------------------------------------------
def test_refine_defaults_to_refine_config(layer):
    weight, stats = layer
    res = dk.refine(weight, stats)                   # backend="auto"
    assert res.backend in dk.BACKENDS
    explicit = dk.refine(weight, stats, dk.RefineConfig(), backend="reference")
    assert torch.equal(res.pruned_mask, explicit.pruned_mask)
    assert torch.equal(res.swaps, explicit.swaps)
    torch.testing.assert_close(res.error_after, explicit.error_after, rtol=1e-5, atol=0.0)
    assert bool((res.pruned_mask.sum(1) == COLS // 2).all())
    assert int(res.swaps.sum()) > 0
    assert res.updated_weight is None
    assert res.sparsity == 0.5


def test_result_types(layer):
    weight, stats = layer
    res = dk.refine(weight, stats, backend="torch")
    assert isinstance(res, dk.RefineResult)
    assert res.pruned_mask.dtype == torch.bool and res.pruned_mask.shape == (ROWS, COLS)
    assert res.swaps.dtype == torch.int32 and res.swaps.shape == (ROWS,)
    assert res.error_before.dtype == torch.float32 and res.error_before.shape == (ROWS,)
    assert res.error_after.dtype == torch.float32 and res.error_after.shape == (ROWS,)
    assert res.backend == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
def test_linear_or_tensor_and_layer_untouched(layer, dtype, init):
    weight, stats = layer
    linear = nn.Linear(COLS, ROWS, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    before_w, before_b = linear.weight.detach().clone(), linear.bias.detach().clone()
    cfg = dk.RefineConfig(sparsity=0.6, init=init)
    from_linear = dk.refine(linear, stats, cfg, backend="torch")
    from_tensor = dk.refine(linear.weight.detach(), stats, cfg, backend="torch")
    assert_same_result(from_linear, from_tensor, init)
    assert torch.equal(linear.weight.detach(), before_w) and torch.equal(linear.bias.detach(), before_b)
    assert linear.weight.requires_grad                 # still a normal parameter
    if init == "sparsegpt":
        assert from_linear.updated_weight is not None and from_linear.updated_weight.dtype == dtype
    else:
        assert from_linear.updated_weight is None


def test_max_cycle_time_zero_is_initial_mask(layer):
    weight, stats = layer
    for pattern in ("unstructured", "2:4"):
        res = dk.refine(weight, stats, dk.RefineConfig(pattern=pattern, max_cycle_time=0), backend="torch")
        problem, _ = dk.build_problem(weight, stats, dk.RefineConfig(pattern=pattern))
        wanda = weight.abs() * stats.scaler_row.sqrt()
        n, m = dk.parse_pattern(pattern)
        assert torch.equal(res.pruned_mask, initial_mask_from_score(wanda, problem.pruned_per_row, n, m))
        assert int(res.swaps.sum()) == 0
        assert torch.equal(res.error_before, res.error_after)
        d = (weight * stats.sum_metric_row).double()
        torch.testing.assert_close(res.error_before.double(), (d * res.pruned_mask).sum(1), rtol=1e-6, atol=1e-6)


def test_given_initial_mask_is_refined_not_replaced(layer):
    weight, stats = layer
    mask = torch.zeros(ROWS, COLS, dtype=torch.bool)
    mask[:, ::3] = True                              # not what Wanda would prune
    res0 = dk.refine(weight, stats, dk.RefineConfig(max_cycle_time=0), backend="torch", initial_mask=mask)
    assert torch.equal(res0.pruned_mask, mask)
    res = dk.refine(weight, stats, backend="torch", initial_mask=mask)
    assert torch.equal(res.pruned_mask.sum(1), mask.sum(1))
    assert int((res.pruned_mask != mask).sum()) == 2 * int(res.swaps.sum()) > 0
    assert not mask[:, 1].any()                      # the caller's mask is not modified


# ---- apply_mask_ ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_mask_zeroes_exactly_the_pruned(layer, dtype):
    weight, stats = layer
    linear = nn.Linear(COLS, ROWS, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    original = linear.weight.detach().clone()
    assert bool((original != 0).all())
    res = dk.refine(linear, stats, backend="torch")
    dk.apply_mask_(linear, res.pruned_mask)
    w = linear.weight.detach()
    assert torch.equal(w == 0, res.pruned_mask)
    assert torch.equal(w[~res.pruned_mask], original[~res.pruned_mask])
    # a tensor layer, and a RefineResult instead of a mask
    tensor = original.clone()
    dk.apply_mask_(tensor, res)
    assert torch.equal(tensor, w)


def test_apply_mask_writes_sparsegpt_weights(layer):
    weight, stats = layer
    linear = nn.Linear(COLS, ROWS)
    with torch.no_grad():
        linear.weight.copy_(weight)
    res = dk.refine(linear, stats, dk.RefineConfig(init="sparsegpt", sparsity=0.5), backend="torch")
    assert res.updated_weight is not None
    assert not torch.equal(res.updated_weight, weight)   # SparseGPT changed kept weights
    dk.apply_mask_(linear, res)
    w = linear.weight.detach()
    expected = res.updated_weight.masked_fill(res.pruned_mask, 0)
    assert torch.equal(w, expected)
    assert torch.equal(w == 0, res.pruned_mask)


def test_apply_mask_bad_mask(layer):
    weight, _ = layer
    with pytest.raises(ValueError, match="mask"):
        dk.apply_mask_(weight.clone(), torch.zeros(ROWS, COLS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        dk.apply_mask_(weight.clone(), torch.zeros(ROWS, COLS))
    with pytest.raises(TypeError, match="layer"):
        dk.apply_mask_(nn.ReLU(), torch.zeros(ROWS, COLS, dtype=torch.bool))
    with pytest.raises(TypeError, match="layer must be an nn.Linear or a weight tensor, got list"):
        dk.apply_mask_(weight.tolist(), torch.zeros(ROWS, COLS, dtype=torch.bool))


# ---- refine_many --------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dk.RefineConfig(sparsity=0.6), dk.RefineConfig(pattern="2:4"),
                                 dk.RefineConfig(init="magnitude", pattern="4:8"),
                                 dk.RefineConfig(init="sparsegpt", sparsity=0.5)],
                         ids=["u60", "2:4", "4:8-magnitude", "u50-sparsegpt"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_refine_many_equals_separate_calls(cfg, backend):
    layers, stats = [], None
    for i, rows in enumerate((5, 12, 1)):
        w, s = make_layer(rows, 48, torch.float16, seed=3 + i, hessian=True)
        layers.append(w)
        stats = stats or s                           # they share an input: one set of statistics
    results = dk.refine_many(layers, stats, cfg, backend=backend)
    assert len(results) == 3
    for w, res in zip(layers, results):
        alone = dk.refine(w, stats, cfg, backend=backend)
        assert_same_result(res, alone, f"{cfg}")
        assert res.backend == backend
        if cfg.init == "sparsegpt":
            assert torch.equal(res.updated_weight, alone.updated_weight)


def test_refine_many_with_masks_and_mismatches():
    w1, stats = make_layer(4, 16, torch.float32, seed=1)
    w2, _ = make_layer(3, 16, torch.float32, seed=2)
    m1 = torch.zeros(4, 16, dtype=torch.bool)
    m1[:, :8] = True
    results = dk.refine_many([w1, w2], stats, backend="torch", initial_masks=[m1, None])
    assert_same_result(results[0], dk.refine(w1, stats, backend="torch", initial_mask=m1))
    assert_same_result(results[1], dk.refine(w2, stats, backend="torch"))
    assert dk.refine_many([], stats) == []
    with pytest.raises(ValueError, match="initial_masks"):
        dk.refine_many([w1, w2], stats, initial_masks=[m1])
    with pytest.raises(ValueError, match=r"layers\[1\]"):
        dk.refine_many([w1, w2.half()], stats, backend="torch")
    # a layer that does not fit the shared statistics is named
    w3, _ = make_layer(3, 8, torch.float32, seed=3)
    with pytest.raises(ValueError, match=r"stats\.sum_metric_row must have shape \[8\] \(layers\[2\]'s in_features\)"):
        dk.refine_many([w1, w2, w3], stats, backend="torch")
    with pytest.raises(ValueError, match=r"M=4 must divide layers\[0\]'s in_features=6"):
        dk.refine_many([torch.zeros(2, 6), torch.zeros(2, 6)], dk.LayerStats(*(torch.ones(6),) * 3),
                       dk.RefineConfig(pattern="2:4"), backend="torch")


def test_refine_many_names_the_mask_of_the_layer():
    w1, stats = make_layer(4, 32, torch.float32, seed=1)
    w2, _ = make_layer(6, 32, torch.float32, seed=2)
    m4 = torch.zeros(4, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"initial_masks\[1\] must have layers\[1\]'s shape \(6, 32\), got \(4, 32\)"):
        dk.refine_many([w1, w2], stats, backend="torch", initial_masks=[m4, m4])
    with pytest.raises(TypeError, match=r"initial_masks\[1\] must be a bool tensor"):
        dk.refine_many([w1, w2], stats, backend="torch", initial_masks=[m4, torch.zeros(6, 32)])
    with pytest.raises(ValueError, match=r"initial_masks\[0\] must prune exactly 2 of every 4"):
        dk.refine_many([w1, w2], stats, dk.RefineConfig(pattern="2:4"), backend="torch",
                       initial_masks=[m4, None])


def test_cycle_budget_beyond_the_extension_falls_back():
    """max_cycle_time >= 2^31 (the extension counts in 32 bits): auto takes torch, an explicit
    ext names the field; reference and torch stop early anyway (queues run out)."""
    w, stats = make_layer(3, 32, torch.float32, seed=4)
    cfg = dk.RefineConfig(sparsity=0.5, max_cycle_time=2 ** 31)
    res = dk.refine(w, stats, cfg)
    assert res.backend in ("torch", "reference")
    assert_same_result(res, dk.refine(w, stats, cfg, backend="reference"))
    if dk.available_backends("cpu", "unstructured")["ext"] is True:
        with pytest.raises(RuntimeError, match=r"max_cycle_time=2147483648 is too large for the ext backend"):
            dk.refine(w, stats, cfg, backend="ext")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_backend_claims_cuda_without_cuda():
    for name, reason in dk.available_backends("cuda", "2:4").items():
        assert isinstance(reason, str) and "CUDA is not available" in reason, (name, reason)
    assert "not mps" in dk.available_backends("mps")["torch"]


def test_stats_accumulator_in_features_types():
    import numpy as np
    assert dk.StatsAccumulator(np.int64(8)).in_features == 8
    for bad in (True, 0, -3, 8.0, "8"):
        with pytest.raises(ValueError, match="in_features must be a positive int"):
            dk.StatsAccumulator(bad)


# ---- backends ----------------------------------------------------------------------------------
def test_available_backends():
    for pattern in ("unstructured", "2:4"):
        avail = dk.available_backends("cpu", pattern)
        assert set(avail) == set(dk.BACKENDS)
        assert avail["reference"] is True and avail["torch"] is True
        for name, value in avail.items():
            assert value is True or (isinstance(value, str) and value), f"{name}: {value!r}"
    assert isinstance(dk.available_backends()["ext"], (bool, str))


def test_triton_on_cpu_without_interpreter_raises(layer, monkeypatch):
    weight, stats = layer
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = dk.available_backends("cpu", "unstructured")["triton"]
    assert isinstance(reason, str) and reason
    with pytest.raises(RuntimeError, match="triton") as info:
        dk.refine(weight, stats, backend="triton")
    assert reason in str(info.value)


def test_disabled_backend_raises(layer, monkeypatch):
    weight, stats = layer
    monkeypatch.setenv("DSNOT_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="DSNOT_DISABLE_TRITON"):
        dk.refine(weight, stats, backend="triton")
    monkeypatch.setenv("DSNOT_DISABLE_EXT", "1")
    with pytest.raises(RuntimeError, match="DSNOT_DISABLE_EXT"):
        dk.refine(weight, stats, dk.RefineConfig(pattern="2:4"), backend="ext")
    # auto never fails: the torch backend always runs
    assert dk.refine(weight, stats, backend="auto").backend == "torch"


@pytest.mark.parametrize("version,refused", [("3.3.1", True), ("3.0.0", True), ("2.3.1", True),
                                              ("3.3.0rc1", True), ("3.4.0", False), ("3.6.0", False),
                                              ("3.10.0", False), ("3.5.0+git9a1b2c", False),
                                              ("4.0.0", False), ("", False), ("unknown", False)])
def test_triton_version_reason(version, refused):
    from dsnot_kernels.backends import triton_version_reason
    reason = triton_version_reason(version)
    assert (reason is not None) == refused, reason
    if refused:
        assert f"triton {version} is older than 3.4" in reason and "backend='torch'" in reason


def test_old_triton_is_refused_with_its_version(layer, monkeypatch):
    """A Triton older than the kernels compile with (torch 2.4-2.7 ship 3.0-3.3) is never
    picked: explicit ``backend="triton"`` says so (``StatsAccumulator`` on CUDA asks the same
    ``unavailable_reason``)."""
    triton = pytest.importorskip("triton")
    weight, stats = layer
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dk.available_backends("cpu", "unstructured")["triton"] is True
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    reason = dk.available_backends("cpu", "unstructured")["triton"]
    assert isinstance(reason, str) and "triton 3.3.1 is older than 3.4" in reason
    with pytest.raises(RuntimeError, match="triton 3.3.1 is older than 3.4"):
        dk.refine(weight, stats, backend="triton")
    assert dk.refine(weight, stats, backend="auto").backend != "triton"


def test_ext_on_cpu_covers_unstructured_or_says_why(layer):
    """The C++ path handles unstructured too; without the extension the reason is reported."""
    weight, stats = layer
    status = dk.available_backends("cpu", "unstructured")["ext"]
    if status is True:
        assert dk.refine(weight, stats, dk.RefineConfig(sparsity=0.5), backend="ext").backend == "ext"
        assert dk.refine(weight, stats, dk.RefineConfig(sparsity=0.5)).backend == "ext"   # auto on CPU
    else:
        assert isinstance(status, str) and status
        with pytest.raises(RuntimeError, match="ext") as info:
            dk.refine(weight, stats, dk.RefineConfig(sparsity=0.5), backend="ext")
        assert status in str(info.value)


def test_refine_with_stats_on_weight_device_after_to(layer):
    weight, stats = layer
    moved = stats.to("cpu")
    assert moved is not stats and torch.equal(moved.scaler_row, stats.scaler_row)
    meta = stats.to("meta")
    assert meta.sum_metric_row.device.type == "meta" and meta.hessian.device.type == "meta"
    assert stats.sum_metric_row.device.type == "cpu"
    # the moved statistics refine the layer as the originals do
    cfg = dk.RefineConfig(sparsity=0.5)
    assert torch.equal(dk.refine(weight, moved, cfg, backend="reference").pruned_mask,
                       dk.refine(weight, stats, cfg, backend="reference").pruned_mask)


def test_robust_preset_keeps_sparsegpt_masks_unless_told():
    """robust + sparsegpt refines nothing by default (measured harmful, README), but can be overridden."""
    assert dk.RefineConfig.robust(init="sparsegpt").max_cycle_time == 0
    assert dk.RefineConfig.robust(init="sparsegpt", max_cycle_time=7).max_cycle_time == 7
    assert dk.RefineConfig.robust(init="wanda").max_cycle_time == 50


def test_numeric_types_and_named_errors(layer):
    """numpy scalars are accepted; a non-number names its field; a bad pattern is refused everywhere."""
    import numpy as np
    weight, stats = layer
    assert dk.RefineConfig(sparsity=np.float32(0.5)).validate().sparsity == 0.5
    # integer max_cycle_time of any integer type (numpy, a 0-d torch tensor) counts like an int
    for cycles in (np.int64(7), torch.tensor(7)):
        cfg = dk.RefineConfig(sparsity=0.5, max_cycle_time=cycles)
        assert type(cfg.max_cycle_time) is int                # (a config stays JSON-serialisable)
        assert torch.equal(dk.refine(weight, stats, cfg).swaps,
                           dk.refine(weight, stats, dk.RefineConfig(sparsity=0.5, max_cycle_time=7)).swaps)
    with pytest.raises(ValueError, match="max_cycle_time"):
        dk.RefineConfig(max_cycle_time=np.float64(7.0))
    counted = replace(stats, nsamples=np.int64(stats.nsamples), ntokens=np.int64(stats.ntokens))
    assert torch.equal(dk.refine(weight, counted).pruned_mask, dk.refine(weight, stats).pruned_mask)
    for field, value in (("update_threshold", "a"), ("pow_of_var_regrowing", None), ("cycle_fraction", "x")):
        with pytest.raises(TypeError, match=field):
            dk.RefineConfig(**{field: value}).validate()
    assert dk.available_backends("cpu", " Unstructured ")["reference"] is True
    with pytest.raises(ValueError, match="pattern"):
        dk.available_backends("cpu", "foo")


def test_only_linear_modules_are_read_as_layers(layer):
    """An ``nn.Linear`` (or a subclass) is read as its weight ``[out, in]``; another module with
    a 2-D weight is refused with a pointer to passing the weight itself: transformers' Conv1D
    stores ``[in, out]``, which refining as if it were ``[out, in]`` would silently get wrong."""
    weight, stats = layer

    class Tagged(nn.Linear):
        pass

    tagged = Tagged(COLS, ROWS, bias=False)
    with torch.no_grad():
        tagged.weight.copy_(weight)
    assert torch.equal(dk.refine(tagged, stats).pruned_mask, dk.refine(weight, stats).pruned_mask)
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(ROWS, COLS)          # weight [in, out] = [COLS, ROWS]
    with pytest.raises(TypeError, match=r"got a Conv1D module: pass its weight as a tensor \[out, in\]"):
        dk.refine(conv, stats)
    with pytest.raises(TypeError, match="Conv1D module"):
        dk.apply_mask_(conv, torch.zeros(ROWS, COLS, dtype=torch.bool))
    # its transposed weight is the layer
    assert dk.refine(conv.weight.T, stats).pruned_mask.shape == (ROWS, COLS)


# ---- edge shapes and settings far beyond a row ---------------------------------------------------
def _backends(pattern: str):
    return [name for name, ok in dk.available_backends("cpu", pattern).items() if ok is True]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layers_without_rows(layer, pattern):
    """A 0-row layer (with or without an initial mask, alone or in refine_many) refines to
    empty results on every backend."""
    _, stats = layer
    cfg = dk.RefineConfig(pattern=pattern, sparsity=0.5)
    empty = torch.zeros(0, COLS)
    for backend in _backends(pattern):
        for mask in (None, torch.zeros(0, COLS, dtype=torch.bool)):
            res = dk.refine(empty, stats, cfg, backend=backend, initial_mask=mask)
            assert res.pruned_mask.shape == (0, COLS) and res.swaps.shape == (0,), backend
        results = dk.refine_many([empty, layer[0]], stats, cfg, backend=backend)
        assert results[0].pruned_mask.shape == (0, COLS), backend
        assert_same_result(results[1], dk.refine(layer[0], stats, cfg, backend=backend), backend)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_max_cycle_time_far_beyond_the_row(layer, pattern):
    """max_cycle_time of 10^9 on 32-column rows: every backend sizes its queues and swap
    history by the row (the C++ N:M path had sized buffers by T: ~64 GB a thread; Triton's N:M
    history tile by T: over its element limit) and gives the reference's result."""
    weight, stats = layer
    cfg = dk.RefineConfig(pattern=pattern, sparsity=0.5, max_cycle_time=10 ** 9, update_threshold=0.0)
    expected = dk.refine(weight, stats, cfg, backend="reference")
    assert int(expected.swaps.max()) > 0
    for backend in _backends(pattern):
        assert_same_result(dk.refine(weight, stats, cfg, backend=backend), expected, backend)


def test_every_pruned_column_regrown_with_a_huge_max_cycle_time():
    """Positive weights and statistics make every swap keep e > 0 (e = the sum of the pruned
    D's, and a swap adds a kept partner's D > 0 for the regrown one's), so with no checks each
    2:4 row regrows all 16 of its pruned columns: the most any row can swap, which the swap
    history (Triton) and the queues (C++) must hold whatever max_cycle_time says."""
    g = torch.Generator().manual_seed(3)
    weight = torch.rand(4, COLS, generator=g) + 0.1
    stats = dk.LayerStats(torch.rand(COLS, generator=g) + 0.5, torch.rand(COLS, generator=g) + 0.5,
                          torch.rand(COLS, generator=g) + 0.5, nsamples=4, ntokens=64)
    cfg = dk.RefineConfig(pattern="2:4", max_cycle_time=10 ** 9, update_threshold=0.0, sign_check=False)
    expected = dk.refine(weight, stats, cfg, backend="reference")
    assert expected.swaps.tolist() == [COLS // 2] * 4
    for backend in _backends("2:4"):
        assert_same_result(dk.refine(weight, stats, cfg, backend=backend), expected, backend)


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5, 2.0])
@pytest.mark.parametrize("var_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_column_factors_var_pow(p, var_dtype):
    """``V^p`` is ``pow(max(V, tiny), p)`` bit for bit (p = 1 skips the pow: x^1 is x), all ones
    for p = 0, and never aliases the caller's statistics."""
    from dsnot_kernels.problem import TINY, column_factors
    var = torch.tensor([0.0, TINY / 2, 1e-30, 0.3, 1.0, 7.5, 3e30], dtype=var_dtype)
    s = torch.linspace(-1, 1, var.numel())
    _, _, var_pow = column_factors(s, var.abs(), var, p)
    expected = torch.pow(var.to(torch.float32).clamp_min(TINY), p) if p else torch.ones(var.numel())
    assert var_pow.dtype == torch.float32 and var_pow.is_contiguous()
    assert torch.equal(var_pow.view(torch.int32), expected.view(torch.int32))
    before = var.clone()
    var_pow.fill_(-1.0)
    assert torch.equal(var, before)

"""The public entry points: :func:`refine`, :func:`refine_many`, :func:`apply_mask_`.

``refine`` checks its inputs (clear errors naming the argument), builds one
:class:`~dsnot_kernels.problem.RefineProblem`, and hands it to a backend. It never modifies the
layer.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .backends import choose_backend, run_backend
from .problem import RefineProblem, column_factors
from .sparsegpt import sparsegpt_prune, sparsegpt_saliency
from .types import LayerStats, RefineConfig, RefineResult

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LayerLike = Union[nn.Linear, torch.Tensor]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _weight_of(layer: LayerLike, name: str = "layer") -> torch.Tensor:
    if isinstance(layer, nn.Module):
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} must be an nn.Linear or a weight tensor [out, in]; "
                            f"{type(layer).__name__} has no weight tensor")
    elif isinstance(layer, torch.Tensor):
        weight = layer
    else:
        raise TypeError(f"{name} must be an nn.Linear or a weight tensor [out, in], got {type(layer).__name__}")
    weight = weight.detach()
    if weight.dim() != 2:
        raise ValueError(f"{name} weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} weight must be float16, bfloat16 or float32, got {weight.dtype}")
    return weight.contiguous()


def _check_values(checks: Sequence[Tuple[str, torch.Tensor, bool]]) -> None:
    """Raise for the first ``(name, tensor, must_be_nonnegative)`` holding NaN/inf (or a negative).

    One ``aminmax`` per tensor answers both questions (NaN propagates into min/max, ±inf shows
    up in one of them; it is several times faster than ``isfinite().all()`` on fp16). The
    minima and maxima travel to the host in ONE transfer and are judged there: on a GPU every
    extra kernel or ``bool(...)`` costs a launch or a sync. The sync comes before the backend's
    kernels are queued, so a caller's next ``refine`` overlaps this one's GPU work (judging
    after the kernels instead was measured ~0.25 ms slower per call in a loop of calls).
    """
    checks = [c for c in checks if c[1].device.type != "meta" and c[1].numel() > 0]
    if not checks:
        return
    extremes = []
    for _, tensor, _ in checks:
        low, high = torch.aminmax(tensor)
        extremes += [low.to(torch.float64), high.to(torch.float64)]
    values = torch.stack(extremes).tolist()
    for i, (name, _, nonnegative) in enumerate(checks):
        low, high = values[2 * i], values[2 * i + 1]
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} contains NaN or inf")
        if nonnegative and low < 0:
            raise ValueError(f"{name} must be >= 0 (it is a mean of squares / a variance)")


def _check_stats(stats: LayerStats, weight: torch.Tensor) -> None:
    if not isinstance(stats, LayerStats):
        raise TypeError(f"stats must be a dsnot_kernels.LayerStats (see StatsAccumulator), got {type(stats).__name__}")
    in_features = weight.shape[1]
    for field in ("sum_metric_row", "scaler_row", "var"):
        value = getattr(stats, field)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"stats.{field} must be a float tensor [{in_features}], got {type(value).__name__}")
        if value.shape != (in_features,):
            raise ValueError(f"stats.{field} must have shape [{in_features}] (the layer's in_features), "
                             f"got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"stats.{field} must be a floating tensor, got {value.dtype}")
        if value.device != weight.device:
            raise ValueError(f"stats.{field} is on {value.device} but the layer weight is on {weight.device}; "
                             f"move them to one device (stats.to(device))")
    try:   # any integer type (numpy, torch scalars) is fine
        nsamples, ntokens = operator.index(stats.nsamples), operator.index(stats.ntokens)
    except TypeError:
        nsamples = ntokens = -1
    if nsamples <= 0 or ntokens < nsamples:
        raise ValueError(f"stats.nsamples must be a positive int and stats.ntokens >= nsamples, "
                         f"got {stats.nsamples!r}, {stats.ntokens!r}")


def _check_hessian(stats: LayerStats, weight: torch.Tensor) -> torch.Tensor:
    h = stats.hessian
    in_features = weight.shape[1]
    if h is None:
        raise ValueError("init='sparsegpt' needs stats.hessian [in, in]: accumulate it with "
                         "StatsAccumulator(in_features, hessian=True)")
    if not isinstance(h, torch.Tensor) or h.shape != (in_features, in_features):
        raise ValueError(f"stats.hessian must be a tensor [{in_features}, {in_features}], "
                         f"got {getattr(h, 'shape', type(h).__name__)}")
    if h.device != weight.device:
        raise ValueError(f"stats.hessian is on {h.device} but the layer weight is on {weight.device}")
    _check_values([("stats.hessian", h, False)])
    return h


def _check_initial_mask(mask: torch.Tensor, weight: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"initial_mask must be a bool tensor [out, in] (True = pruned), "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"initial_mask must have the layer's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"initial_mask is on {mask.device} but the layer weight is on {weight.device}")
    n, m = cfg.nm
    if m:
        per_group = mask.reshape(mask.shape[0], -1, m).sum(-1)
        if not bool((per_group == n).all()):
            raise ValueError(f"initial_mask must prune exactly {n} of every {m} columns for pattern {cfg.pattern!r}")
    return mask.contiguous()


# --------------------------------------------------------------------------------------------
# problem construction
# --------------------------------------------------------------------------------------------
def build_problem(layer: LayerLike, stats: LayerStats, cfg: Optional[RefineConfig] = None,
                  initial_mask: Optional[torch.Tensor] = None, *,
                  shared_from: Optional[RefineProblem] = None
                  ) -> Tuple[RefineProblem, Optional[torch.Tensor]]:
    """Validate the inputs and prepare the backend-independent problem.

    Returns ``(problem, updated_weight)``; ``updated_weight`` is SparseGPT's ``[out, in]``
    weights in the layer's dtype (pruned entries not zeroed) for ``init="sparsegpt"``, else None.
    ``shared_from``: a problem already built from the same ``stats`` (``refine_many``), whose
    checked statistics values and column factors are reused instead of recomputed.
    """
    cfg = RefineConfig() if cfg is None else cfg
    if not isinstance(cfg, RefineConfig):
        raise TypeError(f"cfg must be a dsnot_kernels.RefineConfig, got {type(cfg).__name__}")
    cfg.validate()
    weight = _weight_of(layer)
    _check_stats(stats, weight)
    value_checks = [("layer weight", weight, False)]
    if shared_from is None:
        value_checks += [("stats.sum_metric_row", stats.sum_metric_row, False),
                         ("stats.scaler_row", stats.scaler_row, True), ("stats.var", stats.var, True)]
    _check_values(value_checks)
    n, m = cfg.nm
    in_features = weight.shape[1]
    if m and in_features % m:
        raise ValueError(f"pattern {cfg.pattern!r}: M={m} must divide the layer's in_features={in_features}")
    if initial_mask is not None:
        initial_mask = _check_initial_mask(initial_mask, weight, cfg)

    if shared_from is None:
        s, sqrt_q, var_pow = column_factors(stats.sum_metric_row, stats.scaler_row, stats.var,
                                            cfg.pow_of_var_regrowing)
    else:
        s, sqrt_q, var_pow = shared_from.sum_metric_row, shared_from.sqrt_scaler_row, shared_from.var_pow
    init_col_scale, init_score, updated = None, None, None
    if cfg.init == "sparsegpt":
        hessian = _check_hessian(stats, weight)
        if initial_mask is None:
            initial_mask, new_weight, init_score = sparsegpt_prune(weight, hessian, cfg.sparsity, n, m)
            updated = new_weight.to(weight.dtype)
            weight = updated
        elif m:
            init_score = sparsegpt_saliency(weight, hessian)
    elif cfg.init == "wanda":
        init_col_scale = sqrt_q
    else:  # magnitude
        init_col_scale = torch.ones_like(sqrt_q)

    problem = RefineProblem(
        weight=weight, sum_metric_row=s, sqrt_scaler_row=sqrt_q, var_pow=var_pow,
        init_col_scale=init_col_scale, init_score=init_score, initial_mask=initial_mask,
        pruned_per_row=cfg.pruned_per_row(in_features), prune_n=n, prune_m=m,
        cycles=cfg.cycles_for(in_features), threshold=float(cfg.update_threshold),
        sign_check=cfg.resolved_sign_check(), improve_check=cfg.improve_check,
        moment_check=cfg.moment_check, seq_len=int(stats.ntokens) / int(stats.nsamples))
    return problem, updated


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def refine(layer: LayerLike, stats: LayerStats, cfg: Optional[RefineConfig] = None, *,
           backend: str = "auto", initial_mask: Optional[torch.Tensor] = None) -> RefineResult:
    """Refine the sparse mask of one linear layer with DSnoT (SPEC.md).

    Args:
        layer: an ``nn.Linear`` or its weight ``[out, in]`` (float16/bfloat16/float32), dense.
        stats: :class:`LayerStats` of the layer's inputs, on the weight's device.
        cfg: :class:`RefineConfig`; default 50% unstructured, Wanda init, original settings.
        backend: ``"auto"`` (fastest available for the device) or one of
            ``"reference"``, ``"torch"``, ``"triton"``, ``"ext"``; an explicit backend that
            cannot run raises ``RuntimeError`` with the reason.
        initial_mask: bool ``[out, in]`` (True = pruned) to refine instead of building one.

    Returns:
        :class:`RefineResult` (``pruned_mask`` bool ``[out, in]``, ``swaps`` int32 ``[out]``,
        ``error_before``/``error_after`` float32 ``[out]``, ``backend``, ``updated_weight``).
    """
    problem, updated = build_problem(layer, stats, cfg, initial_mask)
    name = choose_backend(backend, problem.weight.device, problem.is_nm)
    out = run_backend(name, problem)
    return RefineResult(*out, backend=name, updated_weight=updated)


@torch.no_grad()
def refine_many(layers: Sequence[LayerLike], stats: LayerStats, cfg: Optional[RefineConfig] = None, *,
                backend: str = "auto",
                initial_masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[RefineResult]:
    """Refine several layers that read the same input (q/k/v, gate/up) in one backend call.

    Rows of all layers are stacked into one problem (rows are independent in DSnoT, so the
    result equals separate :func:`refine` calls) and split again. All layers must share
    ``in_features`` and dtype.
    """
    if len(layers) == 0:
        return []
    if initial_masks is not None and len(initial_masks) != len(layers):
        raise ValueError(f"initial_masks must have one entry per layer ({len(layers)}), got {len(initial_masks)}")
    masks = list(initial_masks) if initial_masks is not None else [None] * len(layers)
    parts = [build_problem(layers[0], stats, cfg, masks[0])]
    first = parts[0][0]
    parts += [build_problem(layer, stats, cfg, mask, shared_from=first)        # stats checked once
              for layer, mask in zip(layers[1:], masks[1:])]
    for i, (problem, _) in enumerate(parts):
        if problem.cols != first.cols or problem.weight.dtype != first.weight.dtype:
            raise ValueError(f"layers[{i}] has in_features={problem.cols}, dtype={problem.weight.dtype}; "
                             f"refine_many needs all layers to match layers[0] ({first.cols}, {first.weight.dtype})")
    any_mask = any(p.initial_mask is not None for p, _ in parts)
    if any_mask and not all(p.initial_mask is not None for p, _ in parts):
        return [refine(layer, stats, cfg, backend=backend, initial_mask=mask) for layer, mask in zip(layers, masks)]
    cat = lambda field: (None if getattr(first, field) is None  # noqa: E731
                         else torch.cat([getattr(p, field) for p, _ in parts]))
    stacked = RefineProblem(**{**first.__dict__, "weight": cat("weight"), "init_score": cat("init_score"),
                               "initial_mask": cat("initial_mask")})
    name = choose_backend(backend, stacked.weight.device, stacked.is_nm)
    out = run_backend(name, stacked)
    results, r0 = [], 0
    for problem, updated in parts:
        rs = slice(r0, r0 + problem.rows)
        results.append(RefineResult(out.pruned_mask[rs], out.swaps[rs], out.error_before[rs],
                                    out.error_after[rs], backend=name, updated_weight=updated))
        r0 += problem.rows
    return results


@torch.no_grad()
def apply_mask_(layer: LayerLike, mask: Union[torch.Tensor, RefineResult]) -> None:
    """Zero the pruned weights of ``layer`` in place.

    ``mask`` is a bool ``[out, in]`` tensor (True = pruned) or a :class:`RefineResult`; a result
    that carries ``updated_weight`` (SparseGPT) first writes those weights into the layer.
    """
    weight = getattr(layer, "weight", None) if isinstance(layer, nn.Module) else layer
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"layer must be an nn.Linear or a weight tensor, got {type(layer).__name__}")
    updated = None
    if isinstance(mask, RefineResult):
        mask, updated = mask.pruned_mask, mask.updated_weight
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    if updated is not None:
        weight.data.copy_(updated.to(weight.device))
    weight.data.masked_fill_(mask.to(weight.device), 0)

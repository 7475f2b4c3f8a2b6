"""The public entry points: :func:`refine`, :func:`refine_many`, :func:`apply_mask_`.

``refine`` checks its inputs (clear errors naming the argument), builds one
:class:`~dsnot_kernels.problem.RefineProblem`, and hands it to a backend. It never modifies the
layer.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .backends import choose_backend, run_backend
from .problem import RefineOutput, RefineProblem, column_factors
from .sparsegpt import sparsegpt_prune, sparsegpt_saliency
from .types import LayerStats, RefineConfig, RefineResult, as_int

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
LayerLike = Union[nn.Linear, torch.Tensor]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _layer_weight(layer: LayerLike, name: str = "layer", hint: str = "") -> torch.Tensor:
    """The weight tensor of ``layer`` (an ``nn.Linear``, or a weight tensor itself), as stored."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, torch.Tensor):
        return layer
    if isinstance(layer, nn.Module):
        # other modules' 2-D weights need not be [out, in] (transformers' Conv1D stores [in, out],
        # an Embedding [vocab, dim]): refining one as if it were would be silently wrong
        raise TypeError(f"{name} must be an nn.Linear or a weight tensor [out, in], got a "
                        f"{type(layer).__name__} module: pass its weight as a tensor [out, in] "
                        f"(e.g. a Conv1D's weight.T){hint}")
    raise TypeError(f"{name} must be an nn.Linear or a weight tensor, got {type(layer).__name__} "
                    f"(a weight tensor is [out, in])")


def _weight_of(layer: LayerLike, name: str = "layer") -> torch.Tensor:
    """``layer``'s weight ``[out, in]``, checked (shape, device, dtype), detached, contiguous."""
    weight = _layer_weight(layer, name).detach()
    if weight.dim() != 2:
        raise ValueError(f"{name} weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.shape[1] == 0:
        raise ValueError(f"{name} weight must have at least one input column [out, in >= 1], "
                         f"got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"{name} weight is on the meta device, which holds no values: "
                         f"load the weights first (a CPU or CUDA tensor)")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} weight must be float16, bfloat16 or float32, got {weight.dtype}")
    return weight.contiguous()


class _ValueChecks:
    """Value checks of the inputs (NaN/inf, negatives, N:M mask counts) whose verdicts reach the
    host in ONE transfer, judged as late as the backend allows.

    Why: on a GPU every ``bool(tensor)`` is a host sync, and a sync before the backend's kernels
    are queued leaves the GPU idle while the host finishes the problem and launches them.
    :func:`refine` therefore queues these small reductions, starts the copy of their results
    (pinned memory + an event on CUDA), queues the kernels, and only then waits -- for the copy,
    which needs only the reductions (and earlier work), not this call's refinement. Bad input
    still raises before anything is returned; the kernels' outputs are then dropped (they are
    fresh tensors: the caller's layer and statistics are never written).
    """

    def __init__(self) -> None:
        self._pending: list = []   # (message, kind, [0-d tensors]) not yet sent
        self._sent: list = []      # (items, positions, host values, ready event or None)

    def finite(self, name: str, tensor: torch.Tensor, nonnegative: bool = False) -> None:
        """Queue "``tensor`` holds no NaN/inf (and no negative if ``nonnegative``)"."""
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return
        # one aminmax answers both: NaN propagates into min/max, +-inf shows in one of them
        low, high = torch.aminmax(tensor)
        kind = "nonnegative" if nonnegative else "finite"
        if tensor.dtype == torch.float64:
            kind += "-float32"   # the backends compute in float32: the values must fit it too
        self._pending.append((name, kind, [low, high]))

    def flag(self, message: str, bad: torch.Tensor) -> None:
        """Queue "raise ValueError(``message``) if the 0-d bool ``bad`` is True"."""
        if bad.device.type == "meta":
            return
        self._pending.append((message, "flag", [bad]))

    def send(self) -> None:
        """Start the transfer of the checks queued so far (one per device)."""
        items, self._pending = self._pending, []
        by_device: dict = {}
        for item in items:
            by_device.setdefault(item[2][0].device, []).append(item)
        for device, dev_items in by_device.items():
            # stack per dtype (one launch each), then one float64 vector: exact for every
            # float dtype and for bools
            by_dtype: dict = {}
            positions = []
            for _, _, values in dev_items:
                pos = []
                for value in values:
                    group = by_dtype.setdefault(value.dtype, [])
                    pos.append((value.dtype, len(group)))
                    group.append(value)
                positions.append(pos)
            offsets, parts, start = {}, [], 0
            for dtype, group in by_dtype.items():
                offsets[dtype] = start
                parts.append(torch.stack(group).to(torch.float64))
                start += len(group)
            values = parts[0] if len(parts) == 1 else torch.cat(parts)
            flat = [[offsets[dtype] + i for dtype, i in pos] for pos in positions]
            ready = None
            if device.type == "cuda":
                host = torch.empty(values.shape, dtype=torch.float64, pin_memory=True)
                host.copy_(values, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))
                values = host
            self._sent.append((dev_items, flat, values, ready))

    def judge(self) -> None:
        """Wait for every queued check's verdict; raise for the first failure (queue order)."""
        self.send()
        sent, self._sent = self._sent, []
        for items, positions, values, ready in sent:
            if ready is not None:
                ready.synchronize()
            values = values.tolist()
            for (name, kind, _), pos in zip(items, positions):
                got = [values[p] for p in pos]
                if kind == "flag":
                    if got[0]:
                        raise ValueError(name)
                    continue
                low, high = got
                if not (math.isfinite(low) and math.isfinite(high)):
                    raise ValueError(f"{name} contains NaN or inf")
                if kind.endswith("-float32") and max(-low, high) > FLOAT32_MAX:
                    raise ValueError(f"{name} holds values beyond float32's range (|x| > {FLOAT32_MAX:.4g}): "
                                     f"the scores (and SparseGPT's factor) are computed in float32")
                if kind.startswith("nonnegative") and low < 0:
                    raise ValueError(f"{name} must be >= 0 (it is a mean of squares / a variance)")


def _check_stats(stats: LayerStats, weight: torch.Tensor, owner: str = "the layer") -> None:
    """Types, shapes and devices of ``stats`` against ``weight`` (``owner`` names the layer)."""
    if not isinstance(stats, LayerStats):
        raise TypeError(f"stats must be a dsnot_kernels.LayerStats (see StatsAccumulator), got {type(stats).__name__}")
    in_features = weight.shape[1]
    for field in ("sum_metric_row", "scaler_row", "var"):
        value = getattr(stats, field)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"stats.{field} must be a float tensor [{in_features}], got {type(value).__name__}")
        if value.shape != (in_features,):
            raise ValueError(f"stats.{field} must have shape [{in_features}] ({owner}'s in_features), "
                             f"got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"stats.{field} must be a floating tensor, got {value.dtype}")
        if value.device != weight.device:
            raise ValueError(f"stats.{field} is on {value.device} but {owner}'s weight is on {weight.device}; "
                             f"move them to one device (stats.to(device))")
    nsamples, ntokens = as_int(stats.nsamples), as_int(stats.ntokens)   # any integer type, not a bool
    if nsamples is None or ntokens is None or nsamples <= 0 or ntokens < nsamples:
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
    checks = _ValueChecks()
    checks.finite("stats.hessian", h)
    checks.judge()
    return h


def _check_initial_mask(mask: torch.Tensor, weight: torch.Tensor, cfg: RefineConfig,
                        checks: _ValueChecks, name: str = "initial_mask",
                        owner: str = "the layer") -> torch.Tensor:
    """``name``: the argument as the caller wrote it (``initial_masks[2]`` in refine_many)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [out, in] (True = pruned), "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name} must have {owner}'s shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name} is on {mask.device} but {owner}'s weight is on {weight.device}")
    n, m = cfg.nm
    if m:
        per_group = mask.reshape(mask.shape[0], mask.shape[1] // m, m).sum(-1)   # (not -1: 0 rows)
        checks.flag(f"{name} must prune exactly {n} of every {m} columns for pattern {cfg.pattern!r}",
                    (per_group != n).any())
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
    checks = _ValueChecks()
    built = _build_problem(layer, stats, cfg, initial_mask, checks, shared_from=shared_from)
    checks.judge()
    return built


def _build_problem(layer: LayerLike, stats: LayerStats, cfg: Optional[RefineConfig],
                   initial_mask: Optional[torch.Tensor], checks: _ValueChecks, *,
                   name: str = "layer", shared_from: Optional[RefineProblem] = None
                   ) -> Tuple[RefineProblem, Optional[torch.Tensor]]:
    """:func:`build_problem` with the value checks queued on ``checks`` (judged by the caller);
    ``name`` names the layer in error messages."""
    cfg = RefineConfig() if cfg is None else cfg
    if not isinstance(cfg, RefineConfig):
        raise TypeError(f"cfg must be a dsnot_kernels.RefineConfig, got {type(cfg).__name__}")
    cfg.validate()
    weight = _weight_of(layer, name)
    owner = "the layer" if name == "layer" else name
    _check_stats(stats, weight, owner)
    checks.finite(f"{name} weight", weight)
    if shared_from is None:
        checks.finite("stats.sum_metric_row", stats.sum_metric_row)
        checks.finite("stats.scaler_row", stats.scaler_row, nonnegative=True)
        checks.finite("stats.var", stats.var, nonnegative=True)
    n, m = cfg.nm
    in_features = weight.shape[1]
    if m and in_features % m:
        raise ValueError(f"pattern {cfg.pattern!r}: M={m} must divide {owner}'s in_features={in_features}")
    if initial_mask is not None:
        mask_name = "initial_mask" if name == "layer" else name.replace("layers", "initial_masks", 1)
        initial_mask = _check_initial_mask(initial_mask, weight, cfg, checks, mask_name, owner)

    if shared_from is None:
        s, sqrt_q, var_pow = column_factors(stats.sum_metric_row, stats.scaler_row, stats.var,
                                            cfg.pow_of_var_regrowing)
    else:
        s, sqrt_q, var_pow = shared_from.sum_metric_row, shared_from.sqrt_scaler_row, shared_from.var_pow
    init_col_scale, init_score, updated = None, None, None
    if cfg.init == "sparsegpt":
        checks.judge()   # SparseGPT's solve runs on these values right now: judge them first
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


def _triton_tunes(problem: RefineProblem) -> bool:
    """Whether the triton backend times its launches on this call (ops/launch_tuning.py): it
    syncs with the host anyway then, and bad values must not take part in a tuning."""
    from .ops.launch_tuning import needs_tuning
    from .ops.refine import DEFAULT_CAP
    return needs_tuning(problem, DEFAULT_CAP)


def _run_checked(name: str, problem: RefineProblem, checks: _ValueChecks) -> RefineOutput:
    """Run backend ``name`` on ``problem`` and judge ``checks``: after queueing the kernels
    where the backend only queues GPU work whose loops are bounded whatever the values
    (triton, unless it tunes on this call; ext on CUDA), so the GPU never waits for the host's
    verdict; before otherwise."""
    if (name == "triton" and not _triton_tunes(problem)) or \
            (name == "ext" and problem.weight.device.type == "cuda"):
        checks.send()        # the verdicts' copy is queued ahead of the kernels
        out = run_backend(name, problem)
        checks.judge()       # waits for that copy only (and work queued before it)
        return out
    checks.judge()
    return run_backend(name, problem)


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
    checks = _ValueChecks()
    problem, updated = _build_problem(layer, stats, cfg, initial_mask, checks)
    name = choose_backend(backend, problem.weight.device, problem.is_nm, problem)
    out = _run_checked(name, problem, checks)
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
    checks = _ValueChecks()     # every layer's value checks travel to the host together
    parts = [_build_problem(layers[0], stats, cfg, masks[0], checks, name="layers[0]")]
    first = parts[0][0]
    parts += [_build_problem(layer, stats, cfg, mask, checks, name=f"layers[{i}]",
                             shared_from=first)                              # stats checked once
              for i, (layer, mask) in enumerate(zip(layers[1:], masks[1:]), start=1)]
    for i, (problem, _) in enumerate(parts):
        if problem.cols != first.cols or problem.weight.dtype != first.weight.dtype:
            raise ValueError(f"layers[{i}] has in_features={problem.cols}, dtype={problem.weight.dtype}; "
                             f"refine_many needs all layers to match layers[0] ({first.cols}, {first.weight.dtype})")
    any_mask = any(p.initial_mask is not None for p, _ in parts)
    if any_mask and not all(p.initial_mask is not None for p, _ in parts):
        checks.judge()
        return [refine(layer, stats, cfg, backend=backend, initial_mask=mask) for layer, mask in zip(layers, masks)]
    cat = lambda field: (None if getattr(first, field) is None  # noqa: E731
                         else torch.cat([getattr(p, field) for p, _ in parts]))
    stacked = RefineProblem(**{**first.__dict__, "weight": cat("weight"), "init_score": cat("init_score"),
                               "initial_mask": cat("initial_mask")})
    name = choose_backend(backend, stacked.weight.device, stacked.is_nm, stacked)
    out = _run_checked(name, stacked, checks)
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
    weight = _layer_weight(layer, hint=" and the mask of that shape")
    updated = None
    if isinstance(mask, RefineResult):
        mask, updated = mask.pruned_mask, mask.updated_weight
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    if updated is not None:
        weight.data.copy_(updated.to(weight.device))
    weight.data.masked_fill_(mask.to(weight.device), 0)

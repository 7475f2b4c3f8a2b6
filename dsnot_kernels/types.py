"""Plain data types of the public API: statistics, configuration, results.

Nothing here computes anything heavy; validation of *values* (shapes, devices, NaN)
happens in :func:`dsnot_kernels.api.build_problem` when ``refine`` is called.
"""
from __future__ import annotations

import math
import numbers
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch

INIT_METHODS = ("wanda", "magnitude", "sparsegpt")
PRESETS = ("original", "robust")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def as_int(value) -> Optional[int]:
    """``value`` as an int if it is an integer of any type (Python, numpy, a 0-d torch tensor)
    but not a bool, else None: what counts and sizes of the public API accept."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's inputs (SPEC §1), all float32 ``[in]``.

    Attributes:
        sum_metric_row: ``S_j = (1/N) Σ_n Σ_t x[n,t,j]`` (per-sequence sum of the input).
        scaler_row: ``Q_j = (1/N) Σ_n Σ_t x[n,t,j]²`` (Wanda's statistic).
        var: within-sequence population variance of each input channel, averaged over
            samples weighted by token count.
        nsamples: number of calibration sequences ``N``.
        ntokens: total number of tokens seen.
        hessian: optional ``[in, in]`` float32 ``H = (2/N) Σ x xᵀ`` (needed by ``init="sparsegpt"``).
    """

    sum_metric_row: torch.Tensor
    scaler_row: torch.Tensor
    var: torch.Tensor
    nsamples: int = 1
    ntokens: int = 1
    hessian: Optional[torch.Tensor] = None

    @property
    def in_features(self) -> int:
        return int(self.sum_metric_row.shape[-1])

    def to(self, device: torch.device | str) -> "LayerStats":
        """A copy of the statistics on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, sum_metric_row=move(self.sum_metric_row),
                       scaler_row=move(self.scaler_row), var=move(self.var),
                       hessian=move(self.hessian))


def parse_pattern(pattern: str) -> Tuple[int, int]:
    """``"unstructured"`` -> ``(0, 0)``; ``"2:4"`` -> ``(2, 4)`` (N pruned of every M)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str like 'unstructured' or '2:4', got {type(pattern).__name__}")
    if pattern.strip().lower() == "unstructured":
        return 0, 0
    match = _NM_RE.match(pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern {pattern!r}: need 1 <= N < M (N pruned of every M columns)")
    return n, m


@dataclass
class RefineConfig:
    """How to build the initial mask and how DSnoT refines it (SPEC §2-§5).

    Attributes:
        sparsity: fraction of each row pruned, in ``[0, 1)`` (unstructured only; an N:M
            pattern fixes its own sparsity N/M and ignores this).
        pattern: ``"unstructured"`` or ``"N:M"`` with N *pruned* of every M input columns.
        init: initial mask: ``"wanda"``, ``"magnitude"`` or ``"sparsegpt"`` (needs a Hessian).
        max_cycle_time: at most this many swap cycles per row (``T``); 0 = initial mask only.
        update_threshold: a row stops once ``|e| <= update_threshold`` (``τ``).
        pow_of_var_regrowing: ``p`` in the growth score ``G = D / V^p``.
        sign_check: stop a row at the first swap that would flip the sign of its error;
            ``None`` = SPEC default (off for unstructured, on for N:M).
        improve_check: [robust preset] stop a row at the first swap that would not lower ``|e|``.
        moment_check: [robust preset] stop a row at the first swap that would not lower the
            row's expected *squared* output error per token under independent input channels
            (README, "DSnoT that helps"); uses the mean sequence length ``ntokens / nsamples``.
        cycle_fraction: (set by no preset) if set, a row's cycle budget is
            ``min(max_cycle_time, floor(cycle_fraction * pruned_per_row))``.
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    init: str = "wanda"
    max_cycle_time: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    sign_check: Optional[bool] = None
    improve_check: bool = False
    moment_check: bool = False
    cycle_fraction: Optional[float] = None

    def __post_init__(self) -> None:
        # refuse a bad setting where it is made, not at the first refine (which validates
        # again: fields can be changed after construction)
        self.validate()
        self.max_cycle_time = int(self.max_cycle_time)     # a numpy/torch integer -> int (JSON, repr)

    # ---- derived values -------------------------------------------------------------
    @property
    def nm(self) -> Tuple[int, int]:
        """``(N, M)`` of the pattern; ``(0, 0)`` for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def is_nm(self) -> bool:
        return self.nm[1] > 0

    def resolved_sign_check(self) -> bool:
        """The sign check actually used: the explicit setting, else SPEC's per-pattern default."""
        return self.is_nm if self.sign_check is None else bool(self.sign_check)

    def pruned_per_row(self, in_features: int) -> int:
        """Pruned weights per row: ``floor(in · sparsity)`` (unstructured) or ``in · N / M``.

        A 1e-9 guard keeps binary rounding from losing one (``0.57 * 100`` is 56.99999...).
        """
        n, m = self.nm
        if m:
            return in_features // m * n
        return int(math.floor(in_features * self.sparsity + 1e-9))

    def cycles_for(self, in_features: int) -> int:
        """The cycle budget ``T`` used for rows of this width: ``max_cycle_time``, capped by
        ``cycle_fraction`` of :meth:`pruned_per_row` (from ``sparsity``/the pattern, also when
        an ``initial_mask`` is given: one budget for all rows)."""
        if self.cycle_fraction is None:
            return int(self.max_cycle_time)
        budget = int(math.floor(self.cycle_fraction * self.pruned_per_row(in_features)))
        return max(0, min(int(self.max_cycle_time), budget))

    def validate(self) -> "RefineConfig":
        """Raise ``ValueError``/``TypeError`` naming the field if a setting is out of range."""
        self.nm  # parses the pattern, raising on a bad one
        if not isinstance(self.sparsity, numbers.Real) or isinstance(self.sparsity, bool):
            raise TypeError(f"sparsity must be a float in [0, 1), got {self.sparsity!r}")
        if not (0.0 <= float(self.sparsity) < 1.0) or math.isnan(float(self.sparsity)):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for name in ("update_threshold", "pow_of_var_regrowing", "cycle_fraction"):
            value = getattr(self, name)
            if (value is not None or name != "cycle_fraction") and \
                    (not isinstance(value, numbers.Real) or isinstance(value, bool)):
                raise TypeError(f"{name} must be a float, got {value!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        cycles = as_int(self.max_cycle_time)
        if cycles is None or cycles < 0:
            raise ValueError(f"max_cycle_time must be an int >= 0, got {self.max_cycle_time!r}")
        if not math.isfinite(float(self.update_threshold)) or self.update_threshold < 0:
            raise ValueError(f"update_threshold must be a finite float >= 0, got {self.update_threshold!r}")
        if not math.isfinite(float(self.pow_of_var_regrowing)):
            raise ValueError(f"pow_of_var_regrowing must be finite, got {self.pow_of_var_regrowing!r}")
        if self.sign_check not in (None, True, False):
            raise TypeError(f"sign_check must be None, True or False, got {self.sign_check!r}")
        for name in ("improve_check", "moment_check"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cycle_fraction is not None and not (0.0 <= float(self.cycle_fraction) <= 1.0):
            raise ValueError(f"cycle_fraction must be None or in [0, 1], got {self.cycle_fraction!r}")
        return self

    # ---- presets --------------------------------------------------------------------
    @classmethod
    def original(cls, **overrides) -> "RefineConfig":
        """The published DSnoT settings (T=50, τ=0.1, p=1, sign check per SPEC default)."""
        return cls(**overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "RefineConfig":
        """A named preset: ``"original"`` or ``"robust"``; keyword overrides win."""
        if name == "original":
            return cls.original(**overrides)
        if name == "robust":
            return cls.robust(**overrides)
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")

    @classmethod
    def robust(cls, **overrides) -> "RefineConfig":
        """Swaps must lower both ``|e|`` and the squared-error estimate (README, "DSnoT that helps").

        With ``init="sparsegpt"`` it keeps SparseGPT's mask (``max_cycle_time=0``) unless told
        otherwise: DSnoT's error model assumes a regrown weight restores its dense contribution,
        which SparseGPT's compensating update of the kept weights breaks (measured: perplexity
        rises, README).
        """
        settings = dict(improve_check=True, moment_check=True)
        if overrides.get("init") == "sparsegpt":
            settings["max_cycle_time"] = 0
        settings.update(overrides)
        return cls(**settings)


@dataclass
class RefineResult:
    """What :func:`dsnot_kernels.refine` returns.

    Attributes:
        pruned_mask: bool ``[out, in]``, True = pruned.
        swaps: int32 ``[out]``, accepted swaps per row.
        error_before: float32 ``[out]``, the row error ``e`` of the initial mask (SPEC §3).
        error_after: float32 ``[out]``, ``e`` after refinement.
        backend: the implementation that ran.
        updated_weight: ``[out, in]`` in the layer's dtype when the initial method changes
            weights (``sparsegpt``), else ``None``. Pruned entries are *not* zeroed here.
    """

    pruned_mask: torch.Tensor
    swaps: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor
    backend: str
    updated_weight: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return float(self.pruned_mask.float().mean())

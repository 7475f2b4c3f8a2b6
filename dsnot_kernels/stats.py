"""Calibration statistics of a linear layer's inputs (SPEC §1).

Accumulated in float64 from per-sample float64 partial sums, so the result equals a float64
computation from the raw samples (up to float64 rounding) whatever the batching: the
within-sequence variance is a per-sample quantity, computed two-pass inside each sample and
summed as ``Σ_n M2_n`` (M2 = sum of squared deviations), which is the token-weighted mean of
the per-sample variances once divided by the token count. On CUDA, when Triton is present,
the fused statistics kernel in ``dsnot_kernels.ops`` produces the same per-batch partial sums
in one pass over the activations.
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import LayerStats, as_int

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_UPCAST_ELEMENTS = 1 << 24   # samples upcast to float64 at once on the torch path


class StatsAccumulator:
    """Accumulates :class:`LayerStats` over calibration batches.

    Args:
        in_features: width of the layer's input.
        hessian: also accumulate ``H = (2/N) Σ x xᵀ`` (``[in, in]``, for ``init="sparsegpt"``).

    ``update(x)`` takes ``[batch, seq, in]`` (each sequence one sample) or ``[tokens, in]``
    (one sample) in float16/bfloat16/float32, on CPU or CUDA.
    """

    def __init__(self, in_features: int, hessian: bool = False, use_triton: Optional[bool] = None):
        count = as_int(in_features)        # any integer type (numpy, torch scalars), not a bool
        if count is None or count <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        in_features = count
        self.in_features = in_features
        self.track_hessian = bool(hessian)
        self.use_triton = use_triton
        self.nsamples = 0
        self.ntokens = 0
        self._sum = self._sumsq = self._m2 = self._hessian = None

    def _init(self, device: torch.device) -> None:
        z = lambda: torch.zeros(self.in_features, dtype=torch.float64, device=device)  # noqa: E731
        self._sum, self._sumsq, self._m2 = z(), z(), z()
        if self.track_hessian:
            self._hessian = torch.zeros(self.in_features, self.in_features,
                                        dtype=torch.float32, device=device)

    def _want_triton(self, x: torch.Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        if x.device.type != "cuda":
            return False
        if x.dtype == torch.float64:
            return False     # the kernel reads fp16/bf16/fp32; float64 input takes the torch path
        from .backends import unavailable_reason
        return unavailable_reason("triton", x.device) is None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs: ``[batch, seq, in]`` or ``[tokens, in]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, seq, in] or [tokens, in], got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [batch, seq, {self.in_features}] or [tokens, {self.in_features}], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            return
        if self._sum is None:
            self._init(x.device)
        elif x.device != self._sum.device:
            raise ValueError(f"x is on {x.device} but earlier batches were on {self._sum.device}")
        if self._want_triton(x):
            from .ops.stats_kernel import batch_partial_sums
            s, sq, m2 = batch_partial_sums(x)
        else:
            s, sq, m2 = _batch_partial_sums_torch(x)
        self._sum += s
        self._sumsq += sq
        self._m2 += m2
        if self._hessian is not None:
            flat = x.reshape(-1, self.in_features).to(torch.float32)
            self._hessian.addmm_(flat.t(), flat)
        self.nsamples += int(x.shape[0])
        self.ntokens += int(x.shape[0] * x.shape[1])

    def finalize(self) -> LayerStats:
        """The statistics so far as float32 :class:`LayerStats` (the accumulator stays usable)."""
        if self.nsamples == 0:
            raise ValueError("StatsAccumulator.finalize(): no samples were added (call update(x) first)")
        n = float(self.nsamples)
        hessian = None if self._hessian is None else self._hessian * (2.0 / n)
        return LayerStats(sum_metric_row=(self._sum / n).to(torch.float32),
                          scaler_row=(self._sumsq / n).to(torch.float32),
                          var=(self._m2 / self.ntokens).to(torch.float32),
                          nsamples=self.nsamples, ntokens=self.ntokens, hessian=hessian)


def _batch_partial_sums_torch(x: torch.Tensor):
    """Per-batch float64 ``(Σ x, Σ x², Σ_n M2_n)`` over samples and tokens, each ``[in]``."""
    batch, seq, width = x.shape
    step = max(1, _UPCAST_ELEMENTS // (seq * width))
    total = [torch.zeros(width, dtype=torch.float64, device=x.device) for _ in range(3)]
    for b0 in range(0, batch, step):
        xs = x[b0:b0 + step].to(torch.float64)
        sample_sum = xs.sum(1)                                # [b, in]
        mean = sample_sum / seq
        total[0] += sample_sum.sum(0)
        total[1] += (xs * xs).sum((0, 1))
        total[2] += ((xs - mean.unsqueeze(1)) ** 2).sum((0, 1))   # two-pass within each sample
    return tuple(total)

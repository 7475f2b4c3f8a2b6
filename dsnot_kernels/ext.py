"""The compiled N:M backend ``"ext"``: a thin wrapper around ``dsnot_kernels._C``.

The extension (csrc/, built by ``pip install --no-build-isolation -e .``; see README, "Build
switches") runs SPEC §2, §3 and §5 for one layer in one call:

    per row r of W [out, in]:  initial N:M mask, e = Σ_pruned D (float64),
    grow+ / grow- = top-T selections of the pruned columns by G = D / V^p,
    up to T swap cycles with the group-local partner and the acceptance tests

on the C++ CPU path (rows over std::threads, ``torch.get_num_threads()`` of them) or on the
CUDA path (one warp per row). It reads W once in its own dtype (fp16/bf16 are converted per
element, exactly) and writes the mask once.

Importing this module never raises: a missing or broken library is recorded and reported by
:func:`unavailable_reason`.
"""
from __future__ import annotations

from typing import Optional

import torch  # must precede the compiled module (it links against libtorch)

from .problem import RefineOutput, RefineProblem

_C = None
_LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:
    _LOAD_ERROR = (f"dsnot_kernels._C is not built (pip install --no-build-isolation -e . "
                   f"with a C++ compiler; import said: {exc})")
except Exception as exc:  # noqa: BLE001 - e.g. built against another torch
    _LOAD_ERROR = f"dsnot_kernels._C cannot be loaded: {type(exc).__name__}: {exc}"


def has_cuda() -> bool:
    """True if the loaded extension contains the CUDA path."""
    return _C is not None and bool(_C.has_cuda())


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` if the extension can refine N:M problems on ``device``, else a one-line reason."""
    device = torch.device(device)
    if _C is None:
        return _LOAD_ERROR
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not has_cuda():
            return "dsnot_kernels._C was built without CUDA (rebuild with nvcc and a CUDA torch)"
        return None
    return f"dsnot_kernels._C has no path for device {device}"


def refine_ext(problem: RefineProblem) -> RefineOutput:
    """Run an N:M ``problem`` on the compiled extension; exactly the reference's output.

    Raises ``ValueError`` for unstructured problems and ``RuntimeError`` if the extension
    cannot run on the problem's device.
    """
    if not problem.is_nm:
        raise ValueError("refine_ext handles N:M patterns only (problem.prune_m == 0 is unstructured)")
    reason = unavailable_reason(problem.weight.device)
    if reason is not None:
        raise RuntimeError(f"backend 'ext' cannot run: {reason}")
    vec = lambda t: t.to(torch.float32).contiguous()  # noqa: E731 - [in] float32 columns
    init_score = None if problem.init_score is None else problem.init_score.to(torch.float32).contiguous()
    init_col_scale = None if problem.init_col_scale is None or init_score is not None \
        else vec(problem.init_col_scale)
    mask = None if problem.initial_mask is None else problem.initial_mask.contiguous()
    pruned, swaps, before, after = _C.refine_nm(
        problem.weight.contiguous(), vec(problem.sum_metric_row), vec(problem.sqrt_scaler_row),
        vec(problem.var_pow), init_col_scale, init_score, mask,
        int(problem.prune_n), int(problem.prune_m), int(problem.cycles), float(problem.threshold),
        bool(problem.sign_check), bool(problem.improve_check), bool(problem.moment_check),
        float(problem.seq_len))
    return RefineOutput(pruned, swaps, before, after)

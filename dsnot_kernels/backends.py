"""Backend registry: which implementations exist, why one cannot run, and which ``auto`` picks.

| name        | what                                            | module                       |
|-------------|-------------------------------------------------|------------------------------|
| reference   | the oracle, original-style (sorts, sync/cycle)  | dsnot_kernels.reference      |
| torch       | top-T selections, chunked, no per-cycle sync    | dsnot_kernels.torch_fast     |
| triton      | fused kernels, one launch per layer group       | dsnot_kernels.ops            |
| ext         | compiled refinement (C++ CPU: N:M, unstr.; CUDA: N:M) | dsnot_kernels.ext |

Heavy modules (triton, the compiled extension) are imported only when first asked for, so
``import dsnot_kernels`` stays lean.
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Callable, Dict, Optional, Union

import torch

from .problem import RefineOutput, RefineProblem
from .types import parse_pattern

BACKENDS = ("reference", "torch", "triton", "ext")


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return f"{module} cannot be imported: {type(exc).__name__}: {exc}"
    return None


# The oldest Triton whose compiler builds every kernel of this backend. Checked 2026-12-01 by
# compiling each kernel for sm_80/sm_90 and by interpreter parity with the reference (README,
# "Triton versions"): 3.4 to 3.9 pass; 3.3 (torch 2.7's) cannot compile either select kernel;
# the interpreters of 3.0 and 3.1 (torch 2.4, 2.5) already reject the kernels' tl.arange.
TRITON_MIN_VERSION = (3, 4)


def triton_version_reason(version: str) -> Optional[str]:
    """Why Triton ``version`` (``triton.__version__``) cannot run the triton backend, or None
    (also for a version string that does not start with ``major.minor``: let it try)."""
    found = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if found is None or (int(found[1]), int(found[2])) >= TRITON_MIN_VERSION:
        return None
    need = ".".join(map(str, TRITON_MIN_VERSION))
    return (f"triton {version} is older than {need}, the oldest whose compiler builds this "
            f"backend's kernels (torch >= 2.8 installs one): upgrade torch/triton, or "
            f"use backend='torch' (or 'ext')")


def _triton_reason(device: torch.device, nm: bool) -> Optional[str]:
    if os.environ.get("DSNOT_DISABLE_TRITON") == "1":
        return "disabled by DSNOT_DISABLE_TRITON=1"
    try:
        import triton
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if (reason := triton_version_reason(getattr(triton, "__version__", ""))) is not None:
        return reason
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1, a slow test mode)"
    if device.type not in ("cpu", "cuda"):
        return f"triton does not support device {device}"
    return _import_error("dsnot_kernels.ops")


def _ext_reason(device: torch.device, nm: bool) -> Optional[str]:
    if os.environ.get("DSNOT_DISABLE_EXT") == "1":
        return "disabled by DSNOT_DISABLE_EXT=1"
    try:
        from . import ext
    except Exception as exc:  # noqa: BLE001
        return f"dsnot_kernels.ext cannot be imported: {type(exc).__name__}: {exc}"
    return ext.unavailable_reason(device, nm)


_REASONS: Dict[str, Callable[[torch.device, bool], Optional[str]]] = {
    "reference": lambda device, nm: None,
    "torch": lambda device, nm: None,
    "triton": _triton_reason,
    "ext": _ext_reason,
}


def unavailable_reason(name: str, device: Union[torch.device, str] = "cpu", nm: bool = True) -> Optional[str]:
    """``None`` if backend ``name`` can refine tensors on ``device`` (N:M if ``nm``), else why not."""
    if name not in _REASONS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"dsnot_kernels runs on CPU and CUDA tensors, not {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"CUDA is not available here (torch {torch.__version__})"
    return _REASONS[name](device, nm)


# The widest N:M group the triton kernels take. They unroll one step per group member and rank
# a group's members pairwise, so wider groups compile to kernels that spill kilobytes per
# thread (AOT for sm_90: M = 128 streamed select kernel 12 KB of stack; M = 256 81 s to compile,
# 10 KB; the cycles kernel at M = 1024 did not compile in 10 minutes); torch and ext take them.
TRITON_MAX_GROUP = 64


def triton_group_reason(m: int) -> Optional[str]:
    """Why the triton backend cannot run N:M groups of ``m`` columns, or ``None``."""
    if m > TRITON_MAX_GROUP:
        return (f"N:M patterns with M > {TRITON_MAX_GROUP} are not supported by the triton backend "
                f"(got M={m}: its kernels unroll and rank a group's members; use torch or ext)")
    return None


def available_backends(device: Union[torch.device, str] = "cpu",
                       pattern: str = "2:4") -> Dict[str, Union[bool, str]]:
    """Backend name -> ``True``, or the reason it cannot run for ``pattern`` on ``device``."""
    m = parse_pattern(pattern)[1]
    found = {name: (unavailable_reason(name, device, m > 0) or True) for name in BACKENDS}
    if found["triton"] is True:
        found["triton"] = triton_group_reason(m) or True
    return found


def problem_reason(name: str, problem: RefineProblem) -> Optional[str]:
    """``None`` if backend ``name`` (available on the problem's device) can run ``problem``,
    else why not: the triton kernels' queue sort lives in shared memory, which bounds
    ``max_cycle_time`` (far above the default 50); the extension counts cycles in 32 bits."""
    if name == "triton":
        from .ops.refine import limit_reason
        return limit_reason(problem.cycles, problem.cols, problem.is_nm, problem.weight.device,
                            m=problem.prune_m)
    if name == "ext" and problem.cycles > 2 ** 31 - 1:
        return f"max_cycle_time={problem.cycles} is too large for the ext backend (at most 2^31 - 1)"
    return None


def choose_backend(requested: str, device: torch.device, nm: bool,
                   problem: Optional[RefineProblem] = None) -> str:
    """Resolve ``requested`` (a name or ``"auto"``) to a backend that can run (``problem``
    too, when given), or raise."""
    if requested == "auto":
        # Unstructured on CUDA: triton first until a GPU measurement says the ext CUDA path
        # (when built, explicit backend="ext") beats it; on CPU the ext path is the fastest.
        order = ("ext", "triton", "torch") if nm or device.type != "cuda" else ("triton", "torch")
        if device.type != "cuda":
            order = tuple(n for n in order if n != "triton")   # the interpreter is a test mode, never a default
        for name in order:
            if unavailable_reason(name, device, nm) is None and \
                    (problem is None or problem_reason(name, problem) is None):
                return name
        return "torch"
    reason = unavailable_reason(requested, device, nm)
    if reason is None and problem is not None:
        reason = problem_reason(requested, problem)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run here: {reason}")
    return requested


def run_backend(name: str, problem: RefineProblem) -> RefineOutput:
    """Run ``problem`` on backend ``name`` (already checked by :func:`choose_backend`)."""
    if name == "reference":
        from .reference import refine_reference
        return refine_reference(problem)
    if name == "torch":
        from .torch_fast import refine_torch
        return refine_torch(problem)
    if name == "triton":
        from .ops import refine_triton
        return refine_triton(problem)
    if name == "ext":
        from .ext import refine_ext
        return refine_ext(problem)
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")

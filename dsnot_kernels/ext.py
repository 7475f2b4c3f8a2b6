"""The compiled backend ``"ext"``: a thin wrapper around ``dsnot_kernels._C``.

The extension (csrc/, built by ``pip install --no-build-isolation -e .``; see README, "Building
the extension") runs SPEC §2-§5 for one layer in one call:

    per row r of W [out, in]:  initial mask (N:M, or the k lowest scores), e = Σ_pruned D
    (float64), grow+ / grow- = top-T selections of the pruned columns by G = D / V^p,
    unstructured also prune- / prune+ = top-T selections of the kept columns by A,
    up to T swap cycles (group-local partner for N:M) with the acceptance tests

on the C++ CPU path (rows over std::threads, ``torch.get_num_threads()`` of them) or on the
CUDA path (one warp per row; unstructured only if :func:`has_cuda_unstructured`). It reads W
once in its own dtype (fp16/bf16 are converted per element, exactly) and writes the mask once.

Importing this module never raises: a missing or broken library is recorded and reported by
:func:`unavailable_reason`.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch  # must precede the compiled module (it links against libtorch)

from .problem import RefineOutput, RefineProblem

def _is_built() -> bool:
    """Whether a ``dsnot_kernels._C`` file exists to import (loadable or not)."""
    try:
        return importlib.util.find_spec(f"{__package__}._C") is not None
    except (ImportError, ValueError):
        return False


# how to (re)build the extension, for the messages below: in the checkout or unpacked sdist,
# editable (-e) or not, against the torch installed in the environment
INSTALL = "pip install --no-build-isolation [-e] ."


def _load_error(exc: BaseException, built: bool) -> str:
    """Why ``dsnot_kernels._C`` did not load: not ``built``, or built but not loadable (a file
    built against another torch, a broken or truncated file)."""
    if not built:
        return f"dsnot_kernels._C is not built ({INSTALL} with a C++ compiler; import said: {exc})"
    return (f"dsnot_kernels._C is built but cannot be loaded ({type(exc).__name__}: {exc}); rebuild it "
            f"against this torch {torch.__version__}: {INSTALL}")


_C = None
_LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # noqa: BLE001 - any failure to load leaves the other backends
    _LOAD_ERROR = _load_error(exc, _is_built())


def has_cuda() -> bool:
    """True if the loaded extension contains the CUDA path."""
    return _C is not None and bool(_C.has_cuda())


def has_cuda_unstructured() -> bool:
    """True if the loaded extension's CUDA path also handles unstructured problems."""
    return has_cuda() and bool(getattr(_C, "has_cuda_unstructured", lambda: False)())


def unavailable_reason(device: torch.device, nm: bool = True) -> Optional[str]:
    """``None`` if the extension can refine problems on ``device`` (N:M if ``nm``, else
    unstructured), else a one-line reason."""
    device = torch.device(device)
    if _C is None:
        return _LOAD_ERROR
    if device.type == "cpu":
        if not nm and not hasattr(_C, "refine_unstructured"):
            return f"dsnot_kernels._C predates the unstructured path (rebuild: {INSTALL})"
        return None
    if device.type == "cuda":
        if not has_cuda():
            return "dsnot_kernels._C was built without CUDA (rebuild with nvcc and a CUDA torch)"
        if not nm and not has_cuda_unstructured():
            return "dsnot_kernels._C's CUDA path implements N:M patterns only (unstructured runs on CPU tensors)"
        if not torch.cuda.is_available():
            return f"CUDA is not available here (torch {torch.__version__})"
        try:
            torch.cuda.init()        # torch, not the extension, starts CUDA (lazy loading, fork checks)
            index = device.index if device.index is not None else torch.cuda.current_device()
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA in a forked subprocess
            return f"CUDA cannot be used here: {type(exc).__name__}: {exc}"
        if index >= torch.cuda.device_count():
            return f"there is no {device} here ({torch.cuda.device_count()} CUDA devices)"
        return _cuda_image_reason(index)
    return f"dsnot_kernels._C has no path for device {device}"


# cudaError_t values of looking a kernel up on a GPU that cannot run it: no image for it
# (cudaErrorInvalidDeviceFunction, cudaErrorNoKernelImageForDevice), or PTX the driver cannot
# compile (cudaErrorInvalidKernelImage, cudaErrorInvalidPtx, cudaErrorJitCompilerNotFound,
# cudaErrorUnsupportedPtxVersion)
_NO_IMAGE = frozenset({98, 209})
_PTX_NOT_LOADED = frozenset({200, 218, 221, 222})


@functools.lru_cache(maxsize=None)
def _cuda_image_reason(index: int) -> Optional[str]:
    """Why the CUDA path cannot run on GPU ``index`` (the build holds no kernel image that GPU
    loads: a pre-Ampere GPU, an architecture left out of ``TORCH_CUDA_ARCH_LIST``, PTX newer
    than the driver), else None. Asked once per GPU: ``auto`` then takes another backend
    instead of failing at launch."""
    probe = getattr(_C, "cuda_probe", None)
    if probe is None:                    # an older build cannot tell: its launch will
        return None
    with torch.cuda.device(index):       # torch's device guard switches (and restores) devices
        code, message = probe()
    if code == 0:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    gpu = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    if major < 8:
        return f"dsnot_kernels._C's CUDA path needs an sm_80 or newer GPU, not {gpu}"
    rebuild = f'TORCH_CUDA_ARCH_LIST="{major}.{minor}" {INSTALL}'
    if code in _NO_IMAGE:
        return f"dsnot_kernels._C's CUDA path was not built for {gpu}: rebuild with {rebuild}"
    if code in _PTX_NOT_LOADED:
        return (f"the NVIDIA driver cannot compile dsnot_kernels._C's CUDA code (PTX) for {gpu} "
                f"({message}): update the driver, or rebuild with {rebuild}")
    return f"dsnot_kernels._C's CUDA kernels cannot be loaded on {gpu}: CUDA error {code} ({message})"


_ERRORS = {"TypeError": TypeError, "ValueError": ValueError}


def call(name: str, *args, **kwargs):
    """Call ``_C.<name>``: its entry points return ``(error kind, message)`` instead of raising
    (see csrc/binding.cpp for why); this raises the matching Python exception, and
    ``RuntimeError`` with the load error if the extension is not loaded."""
    if _C is None:
        raise RuntimeError(_LOAD_ERROR)
    out = getattr(_C, name)(*args, **kwargs)
    if len(out) == 2 and isinstance(out[0], str):
        raise _ERRORS.get(out[0], RuntimeError)(out[1])
    return out


def refine_ext(problem: RefineProblem) -> RefineOutput:
    """Run ``problem`` (N:M or unstructured) on the compiled extension; exactly the reference's
    output. Raises ``RuntimeError`` if the extension cannot run it on the problem's device."""
    reason = unavailable_reason(problem.weight.device, problem.is_nm)
    if reason is not None:
        raise RuntimeError(f"backend 'ext' cannot run: {reason}")
    vec = lambda t: t.to(torch.float32).contiguous()  # noqa: E731 - [in] float32 columns
    init_score = None if problem.init_score is None else problem.init_score.to(torch.float32).contiguous()
    init_col_scale = None if problem.init_col_scale is None or init_score is not None \
        else vec(problem.init_col_scale)
    mask = None if problem.initial_mask is None else problem.initial_mask.contiguous()
    tensors = (problem.weight.contiguous(), vec(problem.sum_metric_row), vec(problem.sqrt_scaler_row),
               vec(problem.var_pow), init_col_scale, init_score, mask)
    checks = (int(problem.cycles), float(problem.threshold), bool(problem.sign_check),
              bool(problem.improve_check), bool(problem.moment_check), float(problem.seq_len))
    if problem.is_nm:
        out = call("refine_nm", *tensors, int(problem.prune_n), int(problem.prune_m), *checks)
    else:
        out = call("refine_unstructured", *tensors, int(problem.pruned_per_row), *checks)
    return RefineOutput(*out)

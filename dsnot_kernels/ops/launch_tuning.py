"""Which launch of the select kernel ``refine_triton(select="auto")`` uses on a GPU.

The select kernel (kernel 1) has several launches that compute the same bits: one program
per row with the row in registers, the same persistent and seeded, the streamed kernel at
four warps or one, with more or fewer programs per SM, each with the joint or the serial
queue search. Which is fastest depends on the GPU and on the problem's shape, and most were
written in sessions without a GPU (benchmarks/PERF_NOTES.md). So on a CUDA device the first
call for a class of problems (same pattern, dtype, padded width, padded row count, queue
depth and inputs) runs every candidate on the caller's own problem: once to compile and warm
up, then ``REPEATS`` times between CUDA events, and keeps the fastest for that class for the
rest of the process. Later calls of the class launch the winner directly, with no host sync.

Every candidate's output (mask, swaps, both errors) must equal the default launch's bit for
bit. One that differs is dropped with a ``RuntimeWarning`` (it would be a kernel bug on that
GPU), one that cannot be compiled or launched there (e.g. too little shared memory) is
dropped quietly; both are recorded in :func:`tuned_launches`. ``DSNOT_TRITON_TUNE=0`` turns
the tuning off: ``auto`` then takes the default launch (rows for unstructured rows of at
most 4096 columns, streamed otherwise).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

from ..problem import RefineOutput, RefineProblem

REPEATS = 3          # timed runs per candidate (the fastest counts), after one warm-up run
ROWS_MAX_COLS = 16384  # the row kernel holds a row in registers: wider rows spill heavily

# refine_triton keyword arguments of each candidate, the default launches first
CANDIDATES: tuple[dict, ...] = (
    {"select": "rows"},
    {"select": "stream"},
    {"select": "rows", "row_programs_per_sm": 1},
    {"select": "stream", "programs_per_sm": 2},
    {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 16},
    {"select": "rows", "queue_search": "serial"},
    {"select": "stream", "queue_search": "serial"},
)

_TUNED: dict[tuple, dict] = {}     # problem class -> {"launch", "seconds", "dropped", ...}


def enabled(device: torch.device) -> bool:
    """Whether ``select="auto"`` tunes on ``device``: CUDA, compiled kernels (not the
    interpreter, whose times mean nothing), and ``DSNOT_TRITON_TUNE`` not ``0``."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("DSNOT_TRITON_TUNE", "1") != "0")


def needs_tuning(problem: RefineProblem, cap: int) -> bool:
    """Whether ``refine_triton(problem, cap)`` (other knobs at their defaults) tunes on this
    call. ``dk.refine`` judges its input checks before such a call instead of after queueing
    the kernels, so that bad values (NaN) never take part in a tuning."""
    return (enabled(problem.weight.device) and problem.weight.numel() > 0
            and problem_class(problem, cap) not in _TUNED)


def launch_name(knobs: dict) -> str:
    """``{"select": "stream", "num_warps": 1}`` -> ``"select=stream,num_warps=1"``."""
    return ",".join(f"{k}={v}" for k, v in knobs.items())


def default_launch(problem: RefineProblem) -> dict:
    """The launch ``auto`` takes untuned: the faster of the two select kernels on an H100 in
    the last GPU measurement (rows for unstructured rows of <= 4096 columns)."""
    cols = problem.weight.shape[1]
    wide = 1 << max(0, cols - 1).bit_length() > 4096
    return {"select": "stream" if problem.is_nm or wide else "rows"}


def candidates(problem: RefineProblem) -> list[dict]:
    """The candidates that are distinct launches for ``problem``, its default first."""
    cols = problem.weight.shape[1]
    seeded_applies = not problem.is_nm and problem.initial_mask is None
    chosen = [default_launch(problem)]
    for knobs in CANDIDATES:
        if knobs in chosen:
            continue
        if knobs["select"] == "rows" and cols > ROWS_MAX_COLS:
            continue
        if "row_programs_per_sm" in knobs and not seeded_applies:
            continue         # without the seed the persistent launch is the plain row kernel
        if knobs.get("queue_search") == "serial" and cols > 65535:
            continue         # the joint search does not apply: auto is serial already
        chosen.append(knobs)
    return chosen


def problem_class(problem: RefineProblem, cap: int) -> tuple:
    """What the winner is kept for: launches compile per padded width, dtype and flags, and
    their speed moves with the number of rows."""
    w = problem.weight
    rows, cols = w.shape
    pow2 = lambda n: 1 << max(0, int(n) - 1).bit_length()   # noqa: E731
    return (str(w.device), w.dtype, problem.is_nm, problem.prune_n, problem.prune_m,
            pow2(cols), pow2(rows), pow2(max(1, min(int(problem.cycles), cols))), int(cap),
            problem.initial_mask is not None, problem.init_score is not None,
            bool(problem.moment_check))


def same_output(a: RefineOutput, b: RefineOutput) -> bool:
    """Bit-for-bit equality of two refinements of one problem."""
    return all(torch.equal(x, y) for x, y in ((a.pruned_mask, b.pruned_mask), (a.swaps, b.swaps),
                                              (a.error_before, b.error_before),
                                              (a.error_after, b.error_after)))


def time_launch(run: Callable[[], RefineOutput]) -> tuple[float, RefineOutput]:
    """Seconds of the fastest of ``REPEATS`` runs of ``run`` on the current CUDA stream (after
    the caller's warm-up run), and the last run's output."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    best, out = math.inf, None
    for _ in range(REPEATS):
        start.record()
        out = run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best, out


def tuned_refine(problem: RefineProblem, cap: int,
                 run: Callable[..., RefineOutput]) -> RefineOutput:
    """``run(**knobs)`` (``refine_triton`` with ``cap`` bound) with the fastest launch for
    ``problem``'s class; the first call of a class tunes it (module docstring)."""
    key = problem_class(problem, cap)
    entry = _TUNED.get(key)
    if entry is not None:
        return run(**entry["launch"])

    baseline = None
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    failures: list[Exception] = []
    for knobs in candidates(problem):
        name = launch_name(knobs)
        try:
            out = run(**knobs)           # compiles on first use; its output is the check
            elapsed, _ = time_launch(lambda knobs=knobs: run(**knobs))
        except Exception as exc:   # noqa: BLE001 - any launch that fails on this GPU is skipped
            dropped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures.append(exc)
            continue
        if baseline is None:
            baseline = out
        elif not same_output(baseline, out):
            dropped[name] = "output differs from the default launch's"
            warnings.warn(f"triton select launch {name} computed a different result than the "
                          f"default launch on {_device_name(problem.weight.device)} "
                          f"and is not used; please report it", RuntimeWarning, stacklevel=3)
            continue
        seconds[name] = elapsed
    if baseline is None:
        raise failures[0]
    fastest = min(seconds, key=seconds.get)
    launch = next(k for k in candidates(problem) if launch_name(k) == fastest)
    rows, cols = problem.weight.shape
    _TUNED[key] = {"rows": rows, "cols": cols, "pattern": problem_pattern(problem),
                   "dtype": str(problem.weight.dtype).replace("torch.", ""),
                   "launch": launch, "seconds": seconds, "dropped": dropped}
    return baseline


def problem_pattern(problem: RefineProblem) -> str:
    return f"{problem.prune_n}:{problem.prune_m}" if problem.is_nm else "unstructured"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def tuned_launches() -> list[dict]:
    """What the tuning chose so far in this process, one entry per problem class: ``rows``,
    ``cols`` (of the call that tuned it), ``pattern``, ``dtype``, ``launch`` (the winner's
    ``refine_triton`` keywords), ``seconds`` (each candidate's fastest run) and ``dropped``
    (candidate -> why it was not used)."""
    return [dict(entry, launch=launch_name(entry["launch"])) for entry in _TUNED.values()]


def reset() -> None:
    """Forget every tuned class (the next call of each tunes again)."""
    _TUNED.clear()

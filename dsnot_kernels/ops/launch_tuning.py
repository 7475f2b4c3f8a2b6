"""Which launch of the select kernel ``refine_triton(select="auto")`` uses on a GPU.

The select kernel (kernel 1) has several launches that compute the same bits: one program
per row with the row in registers, the same persistent and seeded, the streamed kernel at
four warps or one, with more or fewer programs per SM, each with the joint or the serial
queue search. Which is fastest depends on the GPU and on the problem's shape, and most were
written in sessions without a GPU (benchmarks/PERF_NOTES.md). So on a CUDA device the first
call for a class of problems (same pattern, dtype, tile width, padded row count, queue
depth and inputs) runs every candidate on the caller's own problem: once to compile and warm
up, then ``REPEATS`` times back to back between two CUDA events, and keeps the fastest for
that class for the rest of the process. Later calls of the class launch the winner directly,
with no host sync and no further check.

On that first call every run of every candidate (mask, swaps, both errors) must equal the
first consistent candidate's output (the default launch's, unless it failed) bit for bit.
One that differs is dropped with a ``RuntimeWarning`` (it would be a kernel bug on that
GPU); one that raises (too little shared memory, registers or memory there) is dropped
quietly, unless it left the CUDA context unusable: then the call raises. Both kinds are
recorded in :func:`tuned_launches`. Queues deeper than ``TUNE_MAX_DEPTH`` (512) are not tuned
(their candidates take long to compile). ``DSNOT_TRITON_TUNE=0`` turns the tuning off: ``auto``
then takes the default launch (rows for unstructured rows of at most 4096 columns,
streamed otherwise).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from ..problem import RefineOutput, RefineProblem

REPEATS = 3          # runs per candidate timed together, back to back, after one warm-up run
ROWS_MAX_COLS = 16384  # widest row tile of the row kernel (it holds a row in registers)
# Deepest queue (min(max_cycle_time, in)) that is tuned: the candidates' queue sorts grow with
# it, and so do their compiles (AOT for sm_90 on a 2-core CPU, the one-warp streamed candidate:
# 5 s at 512, 15 s at 1024, over 5 minutes at 4096); deeper queues take the default launch.
TUNE_MAX_DEPTH = 512

# refine_triton keyword arguments of each candidate, the default launches first.
# Streamed at 4 programs per SM: the 4-warp launches take 128 registers (the unstructured one
# capped there), so 4 programs fit in an SM's 64K registers (sm_80/sm_90). The default 8 per
# SM run in 2 waves of ~4 rows each (H100, 4096 rows); 4 per SM in one wave of ~8 rows each,
# so a program's cold first row (its searches have no seed yet) weighs less.
CANDIDATES: tuple[dict, ...] = (
    {"select": "rows"},
    {"select": "stream"},
    {"select": "rows", "row_programs_per_sm": 1},
    {"select": "stream", "programs_per_sm": 4},
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


def applies(problem: RefineProblem) -> bool:
    """Whether ``refine_triton(problem)`` with its knobs at their defaults goes through
    :func:`tuned_refine` (tuning on enabled for the device, a non-empty problem, queues of at
    most ``TUNE_MAX_DEPTH``)."""
    depth = min(int(problem.cycles), problem.weight.shape[1])
    return enabled(problem.weight.device) and problem.weight.numel() > 0 and depth <= TUNE_MAX_DEPTH


def needs_tuning(problem: RefineProblem, cap: int) -> bool:
    """Whether ``refine_triton(problem, cap)`` (other knobs at their defaults) tunes on this
    call. ``dk.refine`` judges its input checks before such a call instead of after queueing
    the kernels, so that bad values (NaN) never take part in a tuning."""
    return applies(problem) and problem_class(problem, cap) not in _TUNED


def launch_name(knobs: dict) -> str:
    """``{"select": "stream", "num_warps": 1}`` -> ``"select=stream,num_warps=1"``."""
    return ",".join(f"{k}={v}" for k, v in knobs.items())


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), in plain Python: on the host
    ``triton.next_power_of_2`` is a ``constexpr_function`` call, ~2 us each on the CPU, and a
    ``refine`` asked 12 to 16 of them."""
    return 1 << max(0, int(n) - 1).bit_length()


def default_launch(problem: RefineProblem) -> dict:
    """The launch ``auto`` takes untuned: the faster of the two select kernels on an H100 in
    the last GPU measurement (rows for unstructured rows of <= 4096 columns)."""
    wide = pow2(problem.weight.shape[1]) > 4096
    return {"select": "stream" if problem.is_nm or wide else "rows"}


def row_block(problem: RefineProblem) -> int:
    """Width of the row kernel's row tile: ``pow2(in)``, for N:M ``pow2(in / M) * pow2(M)``."""
    cols, m = problem.weight.shape[1], problem.prune_m
    return pow2(cols // m) * pow2(m) if problem.is_nm else pow2(cols)


def candidates(problem: RefineProblem) -> list[dict]:
    """The candidates that are distinct launches for ``problem``, its default first."""
    cols = problem.weight.shape[1]
    seeded_applies = not problem.is_nm and problem.initial_mask is None
    chosen = [default_launch(problem)]
    for knobs in CANDIDATES:
        if knobs in chosen:
            continue
        if knobs["select"] == "rows" and row_block(problem) > ROWS_MAX_COLS:
            continue
        if "row_programs_per_sm" in knobs and not seeded_applies:
            continue         # without the seed the persistent launch is the plain row kernel
        if knobs.get("queue_search") == "serial" and cols > 65535:
            continue         # the joint search does not apply: auto is serial already
        chosen.append(knobs)
    return chosen


def problem_class(problem: RefineProblem, cap: int) -> tuple:
    """What the winner is kept for: launches compile per tile width, dtype and flags, and
    their speed moves with the number of rows."""
    w = problem.weight
    rows, cols = w.shape
    return (str(w.device), w.dtype, problem.is_nm, problem.prune_n, problem.prune_m,
            pow2(cols), row_block(problem), pow2(rows), pow2(max(1, min(int(problem.cycles), cols))),
            int(cap), problem.initial_mask is not None, problem.init_score is not None,
            bool(problem.moment_check))


def same_output(a: RefineOutput, b: RefineOutput) -> bool:
    """Bit-for-bit equality of two refinements of one problem (NaN equal to the same NaN)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32) if t.dtype == torch.float32 else t
    return all(torch.equal(bits(x), bits(y)) for x, y in (
        (a.pruned_mask, b.pruned_mask), (a.swaps, b.swaps),
        (a.error_before, b.error_before), (a.error_after, b.error_after)))


def time_launch(run: Callable[[], RefineOutput]) -> tuple[float, list[RefineOutput]]:
    """Seconds per run of ``REPEATS`` runs of ``run`` queued back to back on the current CUDA
    stream (after the caller's warm-up run), and their outputs. Back to back, as in a
    layer-wise loop: a launch's host work overlaps the GPU work queued before it, and the
    GPU never idles between two event records waiting for the host."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    outputs = [run() for _ in range(REPEATS)]
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / REPEATS, outputs


def _context_broken(device: torch.device) -> bool:
    """Whether the CUDA context of ``device`` is unusable (a kernel fault is sticky)."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:   # noqa: BLE001 - any failure here means the context is gone
        return True
    return False


def tuned_refine(problem: RefineProblem, cap: int,
                 run: Callable[..., RefineOutput]) -> RefineOutput:
    """``run(**knobs)`` (``refine_triton`` with ``cap`` bound) with the fastest launch for
    ``problem``'s class; the first call of a class tunes it (module docstring)."""
    key = problem_class(problem, cap)
    entry = _TUNED.get(key)
    if entry is not None:
        return run(**entry["launch"])

    device = problem.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # a fault of earlier work must not blame a candidate
    baseline, baseline_name = None, None
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    first_error: Exception | None = None
    for knobs in candidates(problem):
        name = launch_name(knobs)
        try:
            outputs = [run(**knobs)]     # compiles on first use
            elapsed, timed = time_launch(lambda knobs=knobs: run(**knobs))
            outputs += timed
        except Exception as exc:   # noqa: BLE001 - a launch this GPU cannot run is skipped...
            if _context_broken(device):  # ...unless it broke the context: nothing can run now
                raise RuntimeError(f"triton select launch {name} failed on {_device_name(device)} and "
                                   f"left its CUDA context unusable; set DSNOT_TRITON_TUNE=0 to use "
                                   f"the default launch only, and please report it") from exc
            dropped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if first_error is None:      # without its traceback: its frames hold GPU tensors
                first_error = exc.with_traceback(None)
            continue
        reference = outputs[0] if baseline is None else baseline
        if not all(same_output(reference, out) for out in outputs):
            against = "its own other runs" if baseline is None else f"{baseline_name}'s"
            dropped[name] = f"output differs from {against}"
            warnings.warn(f"triton select launch {name} computed a different result than "
                          f"{against} on {_device_name(device)} and is not used; please report it",
                          RuntimeWarning, stacklevel=3)
            continue
        if baseline is None:
            baseline, baseline_name = outputs[0], name
        seconds[name] = elapsed
    if baseline is None:
        if first_error is None:
            raise RuntimeError(f"no triton select launch gave consistent results on "
                               f"{_device_name(device)}: {dropped}")
        raise first_error
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
    ``refine_triton`` keywords), ``seconds`` (each candidate's time per run, runs queued back
    to back) and ``dropped``
    (candidate -> why it was not used)."""
    return [dict(entry, launch=launch_name(entry["launch"])) for entry in _TUNED.values()]


def reset() -> None:
    """Forget every tuned class (the next call of each tunes again)."""
    _TUNED.clear()

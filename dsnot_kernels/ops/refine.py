"""Host side of the ``"triton"`` backend: :func:`refine_triton` launches the two kernels.

    select_kernel  grid (rows,)                       scores, initial mask, e0, top-T queues
      (seeded: grid (min(rows, SMs x row_programs_per_sm),), programs looping over rows)
      or select_stream_kernel  grid (min(rows, SMs x programs_per_sm),)  the same, programs looping over rows
    cycles_kernel  grid (ceil(rows / BLOCK_R),)       all swap cycles, in registers

Two launches per :class:`RefineProblem` whatever its size: ``refine_many`` stacks the rows of
layers sharing an input (q/k/v, gate/up) into one problem, so a layer group costs two launches.
Nothing synchronises with the host between or inside the kernels.
"""
from __future__ import annotations

import functools
import os

import torch

from ..backends import triton_group_reason
from ..problem import RefineOutput, RefineProblem
from . import launch_tuning
from .launch_tuning import pow2
from .refine_cycles import cycles_kernel
from .refine_select import select_kernel
from .refine_select_stream import select_stream_kernel

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_CAP = 128          # keys kept per queue before the bitonic sort (>= the queue depth)
MAX_CAP = 32768            # per-queue counts share one int64 scan in 16-bit fields
JOINT_MAX_COLS = 65535     # the joint queue search counts whole rows in 16-bit fields
# register cap of the streamed kernel's multi-warp unstructured launch: uncapped, ptxas gives it
# ~224 registers at 4 warps (sm_90, AOT), i.e. two programs per SM; at 128 four fit (as for N:M,
# 128 uncapped), for ~40 spilled loads/stores per row outside its passes over the row
# (benchmarks/aot_kernels.py; none inside them)
STREAM_MAXNREG = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's AMD backend (a ROCm build of torch, whose GPUs are "cuda" devices too) has no
# register cap: a launch that passes ``maxnreg`` raises KeyError there
REGISTER_CAP_OPTION = torch.version.hip is None
MAX_THREADS = 1024         # threads per program (block / workgroup) on NVIDIA and AMD GPUs


def _check(problem: RefineProblem) -> None:
    if not isinstance(problem, RefineProblem):
        raise TypeError(f"problem must be a RefineProblem, got {type(problem).__name__}")
    w = problem.weight
    if w.dim() != 2 or w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"problem.weight must be a 2-D float16/bfloat16/float32 tensor, "
                         f"got {tuple(w.shape)} {w.dtype}")
    if w.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"problem.weight must be a CUDA tensor (or set TRITON_INTERPRET=1), got {w.device}")
    for name in ("sum_metric_row", "sqrt_scaler_row", "var_pow"):
        v = getattr(problem, name)
        if v.shape != (w.shape[1],) or v.dtype != torch.float32 or v.device != w.device:
            raise ValueError(f"problem.{name} must be float32 [{w.shape[1]}] on {w.device}")
    if problem.init_score is None and problem.init_col_scale is None and \
            (problem.initial_mask is None or problem.is_nm):
        raise ValueError("problem needs init_col_scale or init_score to build or rank the initial mask")
    if problem.is_nm and w.shape[1] % problem.prune_m:
        raise ValueError(f"problem.prune_m={problem.prune_m} must divide in_features={w.shape[1]}")


def queue_cap(cycles: int, cols: int, cap: int = DEFAULT_CAP) -> int:
    """Keys sorted per queue for a problem of ``cycles`` and ``cols``: at least the queue depth
    ``pow2(min(cycles, cols))``, else ``cap`` (both capped by the padded row)."""
    tpad = pow2(max(1, min(int(cycles), cols)))
    return max(tpad, pow2(min(cap, pow2(cols))))


def limit_reason(cycles: int, cols: int, nm: bool, device: torch.device,
                 cap: int = DEFAULT_CAP, m: int = 0) -> str | None:
    """``None`` if the kernels can run ``cycles``-deep queues of ``cols``-column rows (N:M
    groups of ``m``) on ``device``, else why not. The ``[NQ, CAP]`` int64 sort of the queue
    heads is staged in shared memory (``NQ * CAP * 8`` bytes per program, measured in the sm_90
    cubins), so very large ``max_cycle_time`` outgrows a GPU's per-block shared memory (227 KB
    on H100/H200, 163 KB on A100, 99 KB on most consumer GPUs). N:M groups wider than
    ``backends.TRITON_MAX_GROUP`` are refused too."""
    if nm and (reason := triton_group_reason(m)):
        return reason
    nq = 2 if nm else 4
    qcap = queue_cap(cycles, cols, cap)
    if qcap > MAX_CAP:
        return (f"max_cycle_time={cycles} is too large for the triton backend "
                f"(at most {MAX_CAP} candidates per queue)")
    need = nq * qcap * 8
    if device.type != "cuda" or need <= 48 * 1024:
        return None              # the interpreter has no limit; every CUDA GPU offers 48 KiB
    have = _shared_memory_per_block(device)
    if need > have:
        most = pow2(have // (nq * 8) + 1) // 2        # the largest power-of-two cap that fits
        return (f"max_cycle_time={cycles} needs {need // 1024} KiB of shared memory per program "
                f"for the triton backend's queue sort; {torch.cuda.get_device_name(device)} "
                f"offers {have // 1024} KiB: use max_cycle_time <= {most} or backend='torch'")
    return None


def _shared_memory_per_block(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` in bytes (what Triton checks at launch)."""
    props = torch.cuda.get_device_properties(device)
    have = getattr(props, "shared_memory_per_block_optin", None)
    if have is None:     # older torch: ask Triton's driver, the number its launch check uses
        from triton.runtime import driver
        index = device.index if device.index is not None else torch.cuda.current_device()
        have = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(have)


def _stream_programs(device: torch.device, per_sm: int) -> int:
    """Programs of a select kernel that loops over rows: ``per_sm`` per SM (3 under the
    interpreter, so that tests exercise programs that loop over several rows)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count * max(1, int(per_sm))


def warp_size(device: torch.device) -> int:
    """Threads per warp of ``device``: 32 on NVIDIA GPUs (and under the interpreter), 64 on
    AMD's datacenter GPUs (ROCm; Triton runs their 64-lane wavefronts as warps)."""
    if device.type != "cuda":
        return 32
    return int(getattr(torch.cuda.get_device_properties(device), "warp_size", 32))


def stream_chunk(chunk: int, cols: int, group: int, threads: int) -> int:
    """Columns per pass of the streamed kernel (its ``CHUNK``): ``chunk`` rounded up to a power
    of two, at most the padded row, at least one N:M group of ``group`` (padded) columns, and
    at least the program's ``threads`` (pass 0 under the interpreter, which runs one thread):
    a chunk narrower than the threads is replicated across them, and the mask pass reads then
    overwrites each key, so every key needs exactly one owner."""
    return max(group, min(pow2(chunk), pow2(cols)), threads)


def launch_options(warps: int, capped: bool) -> dict:
    """Triton launch options of a kernel: ``warps`` warps, no multiply-add contraction
    (the reference's rounding), and where ``capped`` the streamed kernel's register cap
    ``STREAM_MAXNREG`` -- on GPUs whose Triton backend has one (NVIDIA's)."""
    options = {"num_warps": warps, "enable_fp_fusion": False}
    if capped and REGISTER_CAP_OPTION and not INTERPRET:
        options["maxnreg"] = STREAM_MAXNREG
    return options


def stream_mask_chunk(chunk: int, warps: int, nm: bool) -> int:
    """Columns per tile of the streamed kernel's mask pass (its ``MASK_CHUNK``): the chunk for
    N:M; for unstructured rows at most 4 per thread, as at 8 its values and predicates
    overflow the registers (still >= the threads when ``chunk`` is: one owner per key)."""
    return chunk if nm else min(chunk, 4 * 32 * warps)


def _joint_search(queue_search: str, cols: int) -> bool:
    """Whether the select kernel searches the queues jointly (``queue_search`` already checked)."""
    if queue_search == "joint" and cols > JOINT_MAX_COLS:
        raise ValueError(f"queue_search='joint' needs rows of at most {JOINT_MAX_COLS} columns, "
                         f"got {cols}: use 'auto' or 'serial'")
    return queue_search != "serial" and cols <= JOINT_MAX_COLS


def _num_warps(block: int, nm: bool, warp: int = 32) -> int:
    # about 16 elements per thread per row tensor: 8 warps at in = 4096, 32 at in = 16384
    # (16 of AMD's 64-lane warps: a program has at most MAX_THREADS threads);
    # N:M rows of <= 4096 ran best on 4 (H100 num_warps sweep; auto sends N:M to the streamed
    # kernel now, so this applies to select="rows")
    if nm and block <= 4096:
        return 4
    return max(4, min(MAX_THREADS // warp, block // 512))


def _on_weight_device(fn):
    """Run ``fn(problem, ...)`` with the problem's GPU as the current device: Triton launches
    on the current device, which need not be the one the tensors live on (``cuda:1``)."""
    @functools.wraps(fn)
    def on_device(problem, *args, **kwargs):
        weight = getattr(problem, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_cuda:
            with torch.cuda.device(weight.device):
                return fn(problem, *args, **kwargs)
        return fn(problem, *args, **kwargs)
    return on_device


@_on_weight_device
def refine_triton(problem: RefineProblem, cap: int = DEFAULT_CAP,
                  num_warps: int | None = None, block_rows: int | None = None,
                  select: str = "auto", programs_per_sm: int = 8, chunk: int = 1024,
                  queue_search: str = "auto", row_programs_per_sm: int = 0) -> RefineOutput:
    """SPEC §2-§5 for every row of ``problem`` in two Triton launches; exactly the reference.

    ``cap`` (a power of two) bounds the keys per queue that are sorted; it only changes speed
    (tests lower it to exercise the threshold search). ``select`` picks kernel 1: ``"rows"``
    (:mod:`.refine_select`, one program per row, the row in registers), ``"stream"``
    (:mod:`.refine_select_stream`, ``programs_per_sm`` programs per SM looping over rows,
    ``chunk`` columns at a time) or ``"auto"``: on a GPU, with every other knob at its
    default, the fastest of :data:`.launch_tuning.CANDIDATES` for the problem's class, timed
    on its first call (:mod:`.launch_tuning`); else rows for unstructured rows of <= 4096
    columns, stream otherwise (the faster one on an H100 for each). ``num_warps`` overrides the warps of kernel 1 and ``block_rows`` the rows per
    program of the cycles kernel (tuning knobs; ``None`` = the defaults). ``queue_search``:
    ``"joint"`` finds the thresholds of all candidate queues in lockstep (one counting pass or
    block reduction per probe for all queues; rows of at most 65535 columns), ``"serial"`` one
    queue after the other, ``"auto"`` = joint where it applies. ``row_programs_per_sm`` (row
    kernel, unstructured rows without a given mask; else ignored): 0 = one program per row;
    ``n > 0`` = ``n`` programs per SM that loop over the rows, each seeding the exact ``k``-th
    search of the initial mask from its previous row (~5 block reductions per row instead of
    ~10, counted under the interpreter; the result is the same).
    """
    _check(problem)
    if select not in ("auto", "rows", "stream"):
        raise ValueError(f"select must be 'auto', 'rows' or 'stream', got {select!r}")
    for name, value in (("programs_per_sm", programs_per_sm), ("chunk", chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(row_programs_per_sm, int) or isinstance(row_programs_per_sm, bool) \
            or row_programs_per_sm < 0:
        raise ValueError(f"row_programs_per_sm must be an int >= 0, got {row_programs_per_sm!r}")
    if queue_search not in ("auto", "joint", "serial"):
        raise ValueError(f"queue_search must be 'auto', 'joint' or 'serial', got {queue_search!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps}")
    warp = warp_size(problem.weight.device)
    if num_warps is not None and num_warps * warp > MAX_THREADS:
        raise ValueError(f"num_warps={num_warps} exceeds {MAX_THREADS} threads per program on "
                         f"this GPU, whose warps have {warp} threads: use at most {MAX_THREADS // warp}")
    if select == "auto":
        knobs = (num_warps, block_rows, programs_per_sm, chunk, queue_search, row_programs_per_sm)
        if knobs == (None, None, 8, 1024, "auto", 0) and launch_tuning.applies(problem):
            return launch_tuning.tuned_refine(problem, cap, functools.partial(refine_triton, problem, cap))
        select = launch_tuning.default_launch(problem)["select"]
    w = problem.weight.contiguous()
    rows, cols = w.shape
    device = w.device
    mask = torch.empty(rows, cols, dtype=torch.bool, device=device)
    e0 = torch.empty(rows, dtype=torch.float64, device=device)
    swaps = torch.empty(rows, dtype=torch.int32, device=device)
    if rows == 0 or cols == 0:
        empty = torch.zeros(rows, dtype=torch.float32, device=device)
        return RefineOutput(mask, swaps.zero_(), empty, empty.clone())

    joint = _joint_search(queue_search, cols)
    nm = problem.is_nm
    n, m = (problem.prune_n, problem.prune_m) if nm else (0, 0)
    if nm:
        mpad, gpad = pow2(m), pow2(cols // m)
    else:
        mpad, gpad = pow2(cols), 1
    nq = 2 if nm else 4
    cycles = int(problem.cycles)
    depth = max(1, min(cycles, cols))
    tpad = pow2(depth)
    reason = limit_reason(cycles, cols, nm, device, cap, m)
    if reason is not None:
        raise ValueError(reason)
    cap = queue_cap(cycles, cols, cap)
    queues = torch.empty(rows, nq, tpad, dtype=torch.int32, device=device)
    qd = torch.empty(rows, nq, tpad, dtype=torch.float32, device=device)     # D of each entry
    store_a = bool(problem.moment_check) and not nm
    qa = torch.empty(rows, nq, tpad, dtype=torch.float32, device=device) if store_a else qd

    dummy_f = problem.sum_metric_row
    scale = problem.init_col_scale if problem.init_col_scale is not None else dummy_f
    iscore = problem.init_score.contiguous() if problem.init_score is not None else None
    imask = problem.initial_mask.contiguous() if problem.initial_mask is not None else None
    mask_u8 = mask.view(torch.uint8)
    if select == "stream":
        nprog = min(rows, _stream_programs(device, programs_per_sm))
        warps = num_warps or 4
        chunk = stream_chunk(chunk, cols, mpad if nm else 1, 0 if INTERPRET else warp * warps)
        keys = torch.empty(nprog, cols, dtype=torch.int32, device=device)
        sets = torch.empty(nprog, cols, dtype=torch.int8, device=device)
        lines = torch.empty(nprog, nq * cap, dtype=torch.int64, device=device)
        select_stream_kernel[(nprog,)](
            w, problem.sum_metric_row, problem.sqrt_scaler_row, problem.var_pow, scale,
            iscore if iscore is not None else dummy_f,
            imask.view(torch.uint8) if imask is not None else mask_u8,
            mask_u8, e0, queues, qd, qa, keys, sets, lines,
            rows, cols, w.stride(0), iscore.stride(0) if iscore is not None else 0,
            imask.stride(0) if imask is not None else 0, mask.stride(0),
            int(problem.pruned_per_row), depth,
            IS_NM=nm, N=n, M=max(m, 1), MPAD=mpad,
            HAS_MASK=imask is not None, HAS_SCORE=iscore is not None,
            NQ=nq, TPAD=tpad, CAP=cap, STORE_A=store_a, CHUNK=chunk, MASK_CHUNK=stream_mask_chunk(chunk, warps, nm), JOINT=joint,
            **launch_options(warps, capped=not nm and warps >= 4),
        )
    else:
        scratch = torch.empty(rows, nq * cap, dtype=torch.int64, device=device)
        block = gpad * mpad
        seeded = row_programs_per_sm > 0 and not nm and imask is None
        nprog = min(rows, _stream_programs(device, row_programs_per_sm)) if seeded else rows
        select_kernel[(nprog,)](
            w, problem.sum_metric_row, problem.sqrt_scaler_row, problem.var_pow, scale,
            iscore if iscore is not None else dummy_f,
            imask.view(torch.uint8) if imask is not None else mask_u8,
            mask_u8, e0, queues, qd, qa, scratch,
            rows, cols, w.stride(0), iscore.stride(0) if iscore is not None else 0,
            imask.stride(0) if imask is not None else 0, mask.stride(0),
            int(problem.pruned_per_row), depth,
            IS_NM=nm, N=n, M=max(m, 1), GPAD=gpad, MPAD=mpad,
            HAS_MASK=imask is not None, HAS_SCORE=iscore is not None,
            NQ=nq, TPAD=tpad, CAP=cap, STORE_A=store_a, JOINT=joint,
            SEEDED=seeded,
            **launch_options(num_warps or _num_warps(block, nm, warp), capped=False),
        )
    if cycles == 0:
        error_before = e0.to(torch.float32)
        return RefineOutput(mask, swaps.zero_(), error_before, error_before.clone())

    error_before = torch.empty(rows, dtype=torch.float32, device=device)
    error_after = torch.empty(rows, dtype=torch.float32, device=device)
    # swap history slots: each accepted swap regrows a different initially pruned column, so a
    # row swaps at most min(T, its pruned columns) <= min(T, in) = depth <= tpad times
    hpad = tpad if nm else 1
    # rows per program: 128 lanes, fewer when the N:M history/rank tiles get wide
    budget = max(1, min(128, 4096 // (hpad * (mpad * mpad if nm else 1))))
    block_r = min(1 << (budget.bit_length() - 1), pow2(rows))
    if block_rows is not None:
        block_r = pow2(block_rows)
    cycles_kernel[(-(-rows // block_r),)](
        w, problem.sum_metric_row, problem.sqrt_scaler_row, scale,
        iscore if iscore is not None else dummy_f, _params(problem, device),
        mask_u8, e0, queues, qd, qa, swaps, error_before, error_after,
        rows, cols, w.stride(0), iscore.stride(0) if iscore is not None else 0, mask.stride(0), cycles,
        IS_NM=nm, M=max(m, 1), MPAD=mpad if nm else 1, HAS_SCORE=iscore is not None,
        SIGN_CHECK=bool(problem.sign_check), IMPROVE_CHECK=bool(problem.improve_check),
        MOMENT_CHECK=bool(problem.moment_check),
        NQ=nq, TPAD=tpad, HPAD=hpad, BLOCK_R=block_r,
        **launch_options(4 if block_r >= 128 else 1 if block_r <= 32 else 2, capped=False),
    )
    return RefineOutput(mask, swaps, error_before, error_after)


_PARAMS_CACHE: dict = {}


def _params(problem: RefineProblem, device: torch.device) -> torch.Tensor:
    """``[τ, L]`` as a float64 device tensor (a Python float argument would arrive as float32).

    Cached per value and device: building it costs a host-to-device copy, and a layer-wise run
    asks for the same two numbers hundreds of times.
    """
    key = (float(problem.threshold), float(problem.seq_len), str(device))
    params = _PARAMS_CACHE.get(key)
    if params is None:
        if len(_PARAMS_CACHE) > 64:
            _PARAMS_CACHE.clear()
        params = torch.tensor(key[:2], dtype=torch.float64, device=device)
        _PARAMS_CACHE[key] = params
    return params

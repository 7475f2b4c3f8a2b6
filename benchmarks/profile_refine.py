"""Where does one ``refine`` spend its time on CUDA? Kernel-by-kernel breakdown (torch.profiler).

    python benchmarks/profile_refine.py --backend triton --shapes 4096x4096,11008x4096
    python benchmarks/profile_refine.py --sweep      # also try select/cycles launch knobs
    ncu --clock-control none -k regex:'select|cycles' python benchmarks/profile_refine.py --ncu

Prints, per shape and pattern: the wall time of ``dk.refine`` (median of repeats, synchronised),
its host time (until the call returns) and its time per call in a loop of calls (host work of
one call overlapping GPU work of the last), the GPU time of each kernel launched by one call
(profiler), and with --sweep the wall time of ``refine_triton`` under other launch knobs.
``--ncu`` instead makes exactly one ``refine_triton`` call per pattern and per launch in
``NCU_LAUNCHES`` (nothing else), for Nsight Compute to capture each kernel once.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import dsnot_kernels as dk
from bench_refine import make_problem, time_call  # noqa: E402


# Launch knobs of refine_triton tried by --sweep (each with both queue searches). The one-warp
# streamed configurations are "a warp per row": every reduction is warp-local (no block
# barriers) and many independent programs share an SM; chunk >= 32 x warps (the launcher
# raises smaller chunks to that).
SWEEP = [
    {"select": "rows"}, {"select": "rows", "num_warps": 4}, {"select": "rows", "num_warps": 16},
    {"select": "rows", "row_programs_per_sm": 1}, {"select": "rows", "row_programs_per_sm": 2},
    {"select": "stream"},                                           # 4 warps, chunk 1024, 8/SM
    {"select": "stream", "chunk": 512}, {"select": "stream", "chunk": 2048},
    {"select": "stream", "programs_per_sm": 4}, {"select": "stream", "programs_per_sm": 3},
    {"select": "stream", "programs_per_sm": 2},
    {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 4},  # seeds: more rows per program
    {"select": "stream", "num_warps": 2, "chunk": 256, "programs_per_sm": 8},
    {"select": "stream", "num_warps": 2, "chunk": 256, "programs_per_sm": 16},
    {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 8},
    {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 16},
    {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 24},
    {"select": "stream", "num_warps": 1, "chunk": 256, "programs_per_sm": 16},
]


# The launches --ncu makes for Nsight Compute: the row kernel (one program per row; persistent
# and seeded), the streamed kernel at 4 warps and as a warp per row (candidates for auto at in = 4096).
NCU_LAUNCHES = [{"select": "rows"}, {"select": "rows", "row_programs_per_sm": 1}, {"select": "stream"},
                {"select": "stream", "num_warps": 1, "chunk": 128, "programs_per_sm": 16}]


def wall(fn, repeats: int = 10) -> float:
    """Median synchronised wall seconds of ``fn()`` after one warm-up."""
    return time_call(fn, "cuda", repeats)[0]


def host_and_loop(fn, calls: int = 20) -> tuple:
    """``(host, loop)`` seconds per call: ``host`` = until ``fn()`` returns, the GPU idle at the
    start (what the caller's Python waits); ``loop`` = ``calls`` calls back to back, then one
    sync, divided by ``calls`` (a layer-wise run's throughput: host work overlaps GPU work)."""
    fn(); torch.cuda.synchronize()
    host = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return statistics.median(host), (time.perf_counter() - start) / calls


def kernel_times(fn, repeats: int = 5) -> dict:
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name[:60]] += ev.device_time_total / repeats
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ncu", action="store_true",
                    help="one refine_triton call per pattern and NCU_LAUNCHES entry, nothing else")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_refine.py profiles CUDA kernels: it needs a CUDA GPU (none found)")
    from dsnot_kernels.api import build_problem
    from dsnot_kernels.ops import launch_tuning
    from dsnot_kernels.ops.refine import refine_triton
    if args.ncu:
        for shape in args.shapes.split(","):
            out_f, in_f = (int(x) for x in shape.split("x"))
            weight, stats = make_problem(out_f, in_f, "cuda")
            for pattern in args.patterns.split(","):
                cfg = dk.RefineConfig(sparsity=0.6 if pattern == "unstructured" else 0.5, pattern=pattern)
                problem, _ = build_problem(weight, stats, cfg)
                for knobs in NCU_LAUNCHES:
                    refine_triton(problem, **knobs)
                    torch.cuda.synchronize()
                    print(f"ncu launch: {shape} {pattern} {knobs}", flush=True)
        return
    for shape in args.shapes.split(","):
        out_f, in_f = (int(x) for x in shape.split("x"))
        weight, stats = make_problem(out_f, in_f, "cuda")
        for pattern in args.patterns.split(","):
            cfg = dk.RefineConfig(sparsity=0.6 if pattern == "unstructured" else 0.5, pattern=pattern)
            t_all = wall(lambda: dk.refine(weight, stats, cfg, backend=args.backend))
            t_build = wall(lambda: build_problem(weight, stats, cfg))
            problem, _ = build_problem(weight, stats, cfg)
            t_host, t_loop = host_and_loop(lambda: dk.refine(weight, stats, cfg, backend=args.backend))
            print(f"\n== {shape} {pattern} {args.backend}: refine {t_all*1e3:.3f} ms, "
                  f"build_problem {t_build*1e3:.3f} ms, refine host (until it returns) "
                  f"{t_host*1e3:.3f} ms, refine in a loop {t_loop*1e3:.3f} ms/call", flush=True)
            if args.backend == "triton":
                t_tr = wall(lambda: refine_triton(problem))
                print(f"   refine_triton {t_tr*1e3:.3f} ms", flush=True)
                for entry in launch_tuning.tuned_launches():     # select="auto"'s timed choice
                    if (entry["rows"], entry["cols"], entry["pattern"]) == (out_f, in_f, pattern):
                        print(f"   auto launch: {entry['launch']} (of " + ", ".join(
                            f"{k} {v * 1e3:.3f}" for k, v in entry["seconds"].items()) + " ms)")
            for name, us in kernel_times(lambda: dk.refine(weight, stats, cfg, backend=args.backend)).items():
                print(f"   {us/1e3:8.3f} ms  {name}")
            if args.sweep and args.backend == "triton":
                for search in ("joint", "serial"):
                    for knobs in SWEEP:
                        label = " ".join(f"{k}={v}" for k, v in knobs.items())
                        try:
                            t = wall(lambda: refine_triton(problem, queue_search=search, **knobs), repeats=5)
                            print(f"   sweep queue_search={search} {label}: {t*1e3:.3f} ms", flush=True)
                        except Exception as exc:  # noqa: BLE001
                            print(f"   sweep queue_search={search} {label}: {type(exc).__name__} {exc}"[:200])

if __name__ == "__main__":
    main()

"""Host time of a ``backend="triton"`` call, without its kernels, measured on the CPU.

    python benchmarks/host_overhead.py                 # prints a table, saves host_overhead.{json,csv}
    python benchmarks/host_overhead.py --calls 2000 --out /tmp/host

Issue 5's speed targets are wall times of whole calls (``bench_refine.py`` synchronises after
each), so a call's host work -- input checks, column factors, allocations, the launcher's
arithmetic -- counts next to its kernels, and at 4096x4096 the host side was ~0.3 ms of a
~1.2 ms call on the H100 (``PERF_NOTES.md``). That Python work does not need a GPU to be
measured: this script runs the triton backend on the CPU (``TRITON_INTERPRET=1``, set here
before Triton loads) with its three kernels replaced by no-ops, on a small problem so that
the torch operations' own arithmetic is negligible, and reports per call:

- the median host time of ``build_problem`` (checks judged), of ``refine`` and of
  ``refine_many`` over three layers (q/k/v), side by side;
- the ATen operations each dispatches (a ``TorchDispatchMode`` count): on a GPU most of them
  are one kernel launch each (``empty`` and views are not), so their number is what the GPU
  side of the host time scales with.

A GPU adds to these the CUDA launch cost of each operation, Triton's own launch path (argument
binding and specialisation, stubbed out here) for the two kernel launches, and a little
CUDA-only host work (the verdicts' pinned copy and event, the device context, the tuned
launch's lookup); ``profile_refine.py`` measures a call's whole host time there. This measures
the Python part that every device pays.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dsnot_kernels as dk  # noqa: E402
from bench_common import machine_name, write_results_atomic  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = ("select_kernel", "select_stream_kernel", "cycles_kernel")


class _NoLaunch:
    """Stands in for a jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_skipped():
    """Inside the block the triton backend's launches are no-ops (its outputs stay unwritten)."""
    import dsnot_kernels.ops.refine as launcher
    saved = {name: getattr(launcher, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(launcher, name, _NoLaunch())
        yield
    finally:
        for name, kernel in saved.items():
            setattr(launcher, name, kernel)


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def measure(fn, calls: int) -> dict:
    """Median and minimum seconds of ``fn()`` over ``calls`` calls (after 20 warm-up calls),
    and the ATen operations of one call."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    with _OpCount() as counter:
        fn()
    return {"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6,
            "aten_ops": sum(counter.ops.values()), "ops": dict(counter.ops.most_common())}


def cases(out_features: int, in_features: int) -> list:
    """(name, pattern, callable) for the three measured calls of each pattern."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=gen).half() for _ in range(3)]
    acc = dk.StatsAccumulator(in_features)
    acc.update(torch.randn(4, 32, in_features, generator=gen))
    stats = acc.finalize()
    out = []
    for pattern, sparsity in (("unstructured", 0.6), ("2:4", 0.5)):
        cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)
        out += [("build_problem", pattern, lambda cfg=cfg: dk.build_problem(weights[0], stats, cfg)),
                ("refine", pattern, lambda cfg=cfg: dk.refine(weights[0], stats, cfg, backend="triton")),
                ("refine_many x3", pattern,
                 lambda cfg=cfg: dk.refine_many(weights, stats, cfg, backend="triton"))]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per case (default 1000)")
    parser.add_argument("--shape", default="16x128", help="OUTxIN of each layer (default 16x128: "
                        "small, so that the operations' arithmetic does not count)")
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<machine>)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    try:
        out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
        if out_f < 1 or in_f < 4 or in_f % 4:
            raise ValueError
    except ValueError:
        parser.error(f"--shape must be OUTxIN with OUT >= 1 and IN a multiple of 4, got {args.shape!r}")
    import dsnot_kernels.ops.refine as launcher
    if not launcher.INTERPRET:
        parser.error("host_overhead.py runs the triton backend on the CPU: it needs "
                     "TRITON_INTERPRET=1 before Triton loads (unset it or set it to 1)")
    machine = machine_name("cpu")
    out_dir = Path(args.out) if args.out else RESULTS / machine
    print(f"machine: {machine}; python {platform.python_version()}; torch {torch.__version__}; "
          f"layers {out_f}x{in_f} fp16; kernels not launched")
    rows = []
    summary = {"machine": machine, "python": platform.python_version(), "torch": torch.__version__,
               "calls": args.calls, "rows": rows}
    with kernels_skipped():
        for name, pattern, fn in cases(out_f, in_f):
            result = measure(fn, args.calls)
            rows.append({"call": name, "pattern": pattern, "shape": f"{out_f}x{in_f}", **result})
            print(f"  {name:<15} {pattern:<13} median {result['median_us']:7.1f} us  "
                  f"min {result['min_us']:7.1f} us  aten ops {result['aten_ops']:3d}  "
                  + ", ".join(f"{op} {n}" for op, n in result["ops"].items()), flush=True)
            write_results_atomic(out_dir, "host_overhead", summary, rows)   # kept if interrupted
    print(f"saved {out_dir / 'host_overhead.json'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

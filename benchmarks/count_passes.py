"""Selection passes per row of the select kernels, counted under the Triton interpreter.

    python benchmarks/count_passes.py --shapes 48x4096 --patterns unstructured,2:4 --programs 3,12
    python benchmarks/count_passes.py --select rows --patterns unstructured   # persistent row kernel

The select kernels' time goes to chains of passes over each row (the streamed kernel re-reads
its key line; the row kernel makes a block reduction), one per probe of their searches. This
counts them on CPU (``TRITON_INTERPRET=1``, set here before Triton loads): per row, the joint
queue search's probe passes and tie-split passes, by counting calls of the jit helpers that
run once per pass (``joint_step``, ``joint_tie_step``). ``--programs P`` sets how many
programs loop over the rows (``--select rows``: the persistent, seeded row kernel,
``row_programs_per_sm``); a program's first row has no previous row to seed its searches
from, so ``rows / P`` should match the GPU launch (4096 rows on an H100's 132 SMs x 8
programs: ~4 rows per program). Every run is checked against the ``torch`` backend.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import dsnot_kernels as dk  # noqa: E402
from bench_refine import make_problem  # noqa: E402

@contextlib.contextmanager
def counting_calls():
    """Count calls of interpreted jit helpers by name while the block runs."""
    from triton.runtime import interpreter
    calls: collections.Counter = collections.Counter()
    original = interpreter.InterpretedFunction.__call__

    def call(self, *args, **kwargs):
        calls[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.__call__ = call
    try:
        yield calls
    finally:
        interpreter.InterpretedFunction.__call__ = original


def count_passes(rows: int, cols: int, pattern: str = "unstructured", programs: int = 3,
                 chunk: int = 1024, select: str = "stream", kth_endgame_cols: int = 0) -> dict:
    """Passes per row of ``refine_triton(select=select)`` on ``make_problem(rows, cols)``
    (60% unstructured or N:M) with ``programs`` programs looping over the rows (``"rows"``:
    the persistent row kernel, unstructured only; ``kth_endgame_cols``: the streamed
    kernel's register endgame, 0 = none); raises if it differs from torch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_passes needs TRITON_INTERPRET=1 before triton is imported")
    from dsnot_kernels.ops import refine as launcher
    weight, stats = make_problem(rows, cols, "cpu")
    cfg = dk.RefineConfig(sparsity=0.6 if pattern == "unstructured" else 0.5, pattern=pattern)
    problem, _ = dk.build_problem(weight, stats, cfg)
    saved = launcher._stream_programs
    launcher._stream_programs = lambda device, per_sm: programs
    try:
        with counting_calls() as calls:
            knobs = (dict(chunk=chunk, kth_endgame_cols=kth_endgame_cols) if select == "stream"
                     else dict(row_programs_per_sm=1))
            out = launcher.refine_triton(problem, select=select, **knobs)
    finally:
        launcher._stream_programs = saved
    expected = dk.refine(weight, stats, cfg, backend="torch")
    if not (torch.equal(out.pruned_mask, expected.pruned_mask) and torch.equal(out.swaps, expected.swaps)):
        raise AssertionError(f"{rows}x{cols} {pattern}: the {select} kernel differs from the torch backend")
    # probes of the k-th search of the initial mask (unstructured), after its stats pass: the
    # streamed kernel's are the _count passes over its key line (its register endgame costs one
    # _compact pass, then probes in registers); the row kernel's are its block reductions, a
    # search_step each that is neither a joint queue probe (joint_step) nor a seed (seed_step,
    # counted in the stats reduction)
    kth_probes = (calls["_count"] if select == "stream" else
                  calls["search_step"] - calls["joint_step"] - calls["seed_step"])
    return {"shape": f"{rows}x{cols}", "pattern": pattern, "select": select, "programs": programs,
            "queue_probe_passes": calls["joint_step"] / rows, "queue_tie_passes": calls["joint_tie_step"] / rows,
            "kth_probe_passes": kth_probes / rows, "kth_endgame_passes": calls["_compact"] / rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="48x4096", help="comma-separated ROWSxCOLS (default 48x4096)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--programs", default="3,12", help="comma-separated program counts")
    parser.add_argument("--select", default="stream", choices=("stream", "rows"))
    parser.add_argument("--kth-endgame-cols", type=int, default=0,
                        help="streamed kernel: finish the k-th search in registers below this "
                             "bracket size (0 = never, the default; 64 = the old default)")
    args = parser.parse_args(argv)
    for shape in args.shapes.split(","):
        try:
            rows, cols = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes entries must be ROWSxCOLS, got {shape!r}")
        for pattern in args.patterns.split(","):
            for programs in (int(p) for p in args.programs.split(",")):
                r = count_passes(rows, cols, pattern, programs, select=args.select,
                                 kth_endgame_cols=args.kth_endgame_cols)
                print(f"{r['shape']} {args.select} {pattern:>12} programs={programs:3d} ({rows / programs:.1f} rows each): "
                      f"queue probe passes/row {r['queue_probe_passes']:.2f}, tie passes/row "
                      f"{r['queue_tie_passes']:.2f}; k-th probe passes/row {r['kth_probe_passes']:.2f}"
                      + (f", k-th endgame passes/row {r['kth_endgame_passes']:.2f}"   # (no endgame: rows)
                         if args.select == "stream" else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

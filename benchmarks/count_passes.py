"""Selection passes per row of the select kernels, counted under the Triton interpreter.

    python benchmarks/count_passes.py --shapes 48x4096 --patterns unstructured,2:4 --programs 3,12
    python benchmarks/count_passes.py --select rows --patterns unstructured   # persistent row kernel
    python benchmarks/count_passes.py --model smollm2 --layers 0,15,29 --programs 64,16,6

The select kernels' time goes to chains of passes over each row (the streamed kernel re-reads
its key line; the row kernel makes a block reduction), one per probe of their searches. This
counts them on CPU (``TRITON_INTERPRET=1``, set here before Triton loads): per row, the joint
queue search's probe passes and tie-split passes, by counting calls of the jit helpers that
run once per pass (``joint_step``, ``joint_tie_step``). ``--programs P`` sets how many
programs loop over the rows (``--select rows``: the persistent, seeded row kernel,
``row_programs_per_sm``); a program's first row has no previous row to seed its searches
from, so ``rows / P`` should match the GPU launch (4096 rows on an H100's 132 SMs x 8
programs: ~4 rows per program). Every run is checked against the ``torch`` backend.

The synthetic rows of ``bench_refine.make_problem`` share one scale, which flatters the seeds
(a program predicts a row's thresholds from its previous row). ``--model`` counts on real
rows instead: the first ``--rows`` rows of each linear sublayer of ``--layers`` of a model the
driver can load (``smollm2``: the packaged SmolLM2-135M-Instruct, weights dequantised from
its 4-bit GGUF file), with statistics from one forward pass of the dense model over
``--nsamples`` x ``--seqlen`` tokens of the packaged news text (the driver's own statistics
come from the pruned upstream layers; for counting passes the difference does not matter).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path

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
                 chunk: int = 1024, select: str = "stream") -> dict:
    """Passes per row of ``refine_triton(select=select)`` on ``make_problem(rows, cols)``
    (60% unstructured or N:M) with ``programs`` programs looping over the rows (``"rows"``:
    the persistent row kernel, unstructured only); raises if it differs from torch."""
    weight, stats = make_problem(rows, cols, "cpu")
    return count_passes_on(weight, stats, pattern, programs, chunk, select)


def count_passes_on(weight: torch.Tensor, stats: dk.LayerStats, pattern: str = "unstructured",
                    programs: int = 3, chunk: int = 1024, select: str = "stream") -> dict:
    """:func:`count_passes` on a given weight ``[rows, in]`` and its statistics."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_passes needs TRITON_INTERPRET=1 before triton is imported")
    from dsnot_kernels.ops import refine as launcher
    rows, cols = weight.shape
    cfg = dk.RefineConfig(sparsity=0.6 if pattern == "unstructured" else 0.5, pattern=pattern)
    problem, _ = dk.build_problem(weight, stats, cfg)
    saved = launcher._stream_programs
    launcher._stream_programs = lambda device, per_sm: programs
    try:
        with counting_calls() as calls:
            knobs = dict(chunk=chunk) if select == "stream" else dict(row_programs_per_sm=1)
            out = launcher.refine_triton(problem, select=select, **knobs)
    finally:
        launcher._stream_programs = saved
    expected = dk.refine(weight, stats, cfg, backend="torch")
    if not (torch.equal(out.pruned_mask, expected.pruned_mask) and torch.equal(out.swaps, expected.swaps)):
        raise AssertionError(f"{rows}x{cols} {pattern}: the {select} kernel differs from the torch backend")
    # probes of the k-th search of the initial mask (unstructured), after its stats pass: the
    # streamed kernel's are the _count3 passes over its key line (three keys each); the row
    # kernel's are its block reductions, a search_step each that is neither a joint queue probe
    # (joint_step) nor a seed (seed_step, counted in the stats reduction)
    kth_probes = (calls["_count3"] if select == "stream" else
                  calls["search_step"] - calls["joint_step"] - calls["seed_step"])
    return {"shape": f"{rows}x{cols}", "pattern": pattern, "select": select, "programs": programs,
            "queue_probe_passes": calls["joint_step"] / rows, "queue_tie_passes": calls["joint_tie_step"] / rows,
            "kth_probe_passes": kth_probes / rows}


def model_sublayers(model: str, layer_ids: list[int], rows: int, nsamples: int = 8, seqlen: int = 256,
                    seed: int = 0) -> list[tuple[str, torch.Tensor, dk.LayerStats]]:
    """``(name, weight [rows, in] float16, statistics)`` of every linear sublayer of the decoder
    layers ``layer_ids`` of ``model`` (its first ``rows`` rows), with statistics of the dense
    model's inputs from one forward pass over the packaged news text (see the module doc)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))   # run from a checkout
    from dsnot_prune.data import calibration_tokens, plan_text
    from dsnot_prune.models import find_decoder_layers, find_linears, load_model
    quiet = lambda *a, **k: None  # noqa: E731
    net, tokenizer, _ = load_model(model, torch.float32, log=quiet)
    tokens = calibration_tokens(plan_text("news", None, None), tokenizer, nsamples, seqlen, seed, log=quiet)
    _, layers = find_decoder_layers(net)
    if any(not 0 <= i < len(layers) for i in layer_ids):
        raise ValueError(f"--layers must be in 0..{len(layers) - 1}, got {layer_ids}")
    found, hooks = [], []
    for i in layer_ids:
        for name, linear in find_linears(layers[i]).items():
            acc = dk.StatsAccumulator(linear.in_features)
            hooks.append(linear.register_forward_hook(lambda m, args, out, acc=acc: acc.update(args[0])))
            found.append((f"layer{i}.{name}", linear, acc))
    try:
        with torch.no_grad():
            net(tokens, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, linear.weight.detach()[:rows].to(torch.float16).contiguous(), acc.finalize())
            for name, linear, acc in found]


def _report(label: str, r: dict, rows: int, select: str) -> None:
    print(f"{label} {select} {r['pattern']:>12} programs={r['programs']:3d} "
          f"({rows / r['programs']:.1f} rows each): "
          f"queue probe passes/row {r['queue_probe_passes']:.2f}, tie passes/row "
          f"{r['queue_tie_passes']:.2f}; k-th probe passes/row {r['kth_probe_passes']:.2f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="48x4096", help="comma-separated ROWSxCOLS (default 48x4096)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--programs", default="3,12", help="comma-separated program counts")
    parser.add_argument("--select", default="stream", choices=("stream", "rows"))
    parser.add_argument("--model", default=None,
                        help="count on real rows of this model's linear sublayers instead of "
                             "--shapes (smollm2 = the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="0", help="--model: comma-separated decoder layer indices")
    parser.add_argument("--rows", type=int, default=48, help="--model: rows counted per sublayer")
    args = parser.parse_args(argv)
    try:
        programs_list = [int(p) for p in args.programs.split(",")]
    except ValueError:
        programs_list = []
    if not programs_list or min(programs_list) < 1:
        parser.error(f"--programs must be comma-separated integers >= 1, got {args.programs!r}")
    patterns = [p.strip() for p in args.patterns.split(",")]
    for pattern in patterns:
        try:
            dk.parse_pattern(pattern)
        except ValueError as exc:
            parser.error(f"--patterns: {exc}")
    if args.model is not None:
        try:
            layer_ids = [int(x) for x in args.layers.split(",")]
        except ValueError:
            parser.error(f"--layers must be comma-separated integers, got {args.layers!r}")
        if args.rows < 1:
            parser.error(f"--rows must be >= 1, got {args.rows}")
        try:
            sublayers = model_sublayers(args.model, layer_ids, args.rows)
        except ValueError as exc:                  # (a layer the model lacks)
            parser.error(str(exc))
        for name, weight, stats in sublayers:
            for pattern in patterns:
                for programs in programs_list:
                    r = count_passes_on(weight, stats, pattern, programs, select=args.select)
                    _report(f"{name} {weight.shape[0]}x{weight.shape[1]}", r, weight.shape[0], args.select)
        return 0
    shapes = []
    for shape in args.shapes.split(","):
        try:
            rows, cols = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            rows = cols = 0
        if rows < 1 or cols < 1:
            parser.error(f"--shapes entries must be ROWSxCOLS of positive integers, got {shape!r}")
        shapes.append((rows, cols))
    for rows, cols in shapes:
        for pattern in patterns:
            for programs in programs_list:
                r = count_passes(rows, cols, pattern, programs, select=args.select)
                _report(r["shape"], r, rows, args.select)
    return 0


if __name__ == "__main__":
    sys.exit(main())

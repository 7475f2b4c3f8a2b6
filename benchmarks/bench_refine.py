"""Time ``dsnot_kernels.refine`` per backend against the original-style reference, side by side.

For LLaMA-7B layer shapes (fp16 weights; 60% unstructured and 2:4 by default) every available
backend runs in this one process: a warm-up, then the median of ``--repeats`` runs (the
reference, which takes seconds, runs ``--reference-repeats`` times). Each backend's mask, swaps
and errors are checked against the reference's. Optionally the peak *extra* memory of one
refine is measured in a fresh subprocess (CPU: peak RSS growth; CUDA: peak allocated growth),
and on CUDA the whole LLaMA-7B set (32 layers x 7 sublayers, q/k/v and gate/up batched with
``refine_many``) is timed. On CUDA the triton backend's ``select="auto"`` times its candidate
launches in its warm-up call (``dsnot_kernels/ops/launch_tuning.py``); what it chose, with each
candidate's time, is printed and saved as ``triton_tuned_launches`` in the JSON. Results: a printed table, CSV (long format) and JSON under
``benchmarks/results/<machine>/``.

    python benchmarks/bench_refine.py --device cpu
    python benchmarks/bench_refine.py --device cuda --llama7b-set
    python benchmarks/bench_refine.py --device cuda --llama7b-set --triton-variants queue_search=serial
    TRITON_INTERPRET=1 python benchmarks/bench_refine.py --device cpu --smoke   # interpreter smoke mode
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import dsnot_kernels as dk
from dsnot_kernels.backends import unavailable_reason
from bench_common import format_tuned, machine_name, write_results_atomic  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]      # [out, in]
SMOKE_SHAPES = [(64, 512)]
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# problem and timing helpers
# --------------------------------------------------------------------------------------------
def make_problem(out_features: int, in_features: int, device: str, seed: int = 0):
    """Synthetic fp16 weight ``[out, in]`` with LLaMA-like scale and statistics of real form."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(out_features, in_features, dtype=torch.float16)
    for r0 in range(0, out_features, 256):   # in slices: no float32 copy of the whole layer
        rows = weight[r0:r0 + 256]
        rows.copy_(torch.randn(rows.shape, generator=gen) * 0.02)
    seq, nsamples = 2048, 128
    mean = torch.randn(in_features, generator=gen) * 0.05
    var = torch.rand(in_features, generator=gen) * 0.5 + 0.01
    stats = dk.LayerStats(sum_metric_row=mean * seq, scaler_row=(var + mean ** 2) * seq,
                          var=var, nsamples=nsamples, ntokens=nsamples * seq)
    return weight.to(device), stats.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int, warmup: int = 1):
    """Median and all wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + written), for the roofline column."""
    n = (1 << 28) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _ = time_call(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    return 2 * n / median


def outputs_agree(expected: dk.RefineResult, actual: dk.RefineResult) -> bool:
    """DESIGN.md's exactness: masks and swaps equal, ``error_after`` within 1e-5 relative."""
    e_err, a_err = expected.error_after.double().cpu(), actual.error_after.double().cpu()
    return (torch.equal(expected.pruned_mask.cpu(), actual.pruned_mask.cpu())
            and torch.equal(expected.swaps.cpu().long(), actual.swaps.cpu().long())
            and bool(((e_err - a_err).abs() <= 1e-5 * e_err.abs()).all()))


# --------------------------------------------------------------------------------------------
# peak memory of one refine, in a fresh process
# --------------------------------------------------------------------------------------------
_MEMORY_CHILD = r"""
import sys, json, torch
sys.path.insert(0, {bench_dir!r})
import dsnot_kernels as dk
from bench_refine import make_problem
out_f, in_f, device, backend, pattern, sparsity = {args!r}
weight, stats = make_problem(out_f, in_f, device)
cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)
# load kernels/extension first (on CUDA the whole problem: triton's auto tunes its launch then)
dk.refine(weight if device == "cuda" else weight[:8], stats, cfg, backend=backend)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = dk.refine(weight, stats, cfg, backend=backend); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and so starts at the *parent's* RSS at fork.
    # Extra = peak after - current RSS before (not the earlier peak setup may have set): conservative.
    status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
    base = status("VmRSS:")
    res = dk.refine(weight, stats, cfg, backend=backend)
    peak = status("VmHWM:") - base
print(json.dumps({{"peak_extra_bytes": int(peak)}}))
"""


def peak_extra_memory(out_f, in_f, device, backend, pattern, sparsity) -> float:
    """Peak extra bytes of one refine (CPU: peak RSS (VmHWM) over the RSS before; CUDA: peak allocated growth)."""
    code = _MEMORY_CHILD.format(bench_dir=str(Path(__file__).resolve().parent),
                                args=(out_f, in_f, device, backend, pattern, sparsity))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


@contextlib.contextmanager
def triton_knobs(knobs: dict):
    """Run ``dk.refine``'s triton backend with launcher knobs (``refine_triton`` keyword
    arguments, e.g. ``queue_search="serial"``) inside the block: a benchmark-only switch for
    side-by-side comparisons of kernel variants in one run."""
    import dsnot_kernels.ops as ops
    original = ops.refine_triton
    ops.refine_triton = functools.partial(original, **knobs)
    # no launch tuning for a pinned launch: else dk.refine would judge its input checks before
    # the kernels on every call (it does so before a tuning call), unlike the tuned auto row
    tune = os.environ.get("DSNOT_TRITON_TUNE")
    if knobs:
        os.environ["DSNOT_TRITON_TUNE"] = "0"
    try:
        yield
    finally:
        ops.refine_triton = original
        if tune is None:
            os.environ.pop("DSNOT_TRITON_TUNE", None)
        else:
            os.environ["DSNOT_TRITON_TUNE"] = tune


def parse_variants(text: str | None) -> list:
    """``"queue_search=serial;select=rows,queue_search=serial"`` -> list of knob dicts."""
    variants = []
    for part in filter(None, (text or "").split(";")):
        knobs = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if not key or not value:
                raise SystemExit(f"--triton-variants: expected key=value[,key=value], got {part!r}")
            knobs[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
        variants.append(knobs)
    return variants


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, variants: list) -> None:
    """Refuse bad options before anything is measured (``parser.error``: exit 2, the option named)."""
    for option, value in (("--repeats", args.repeats), ("--reference-repeats", args.reference_repeats)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if args.llama7b_set and args.device != "cuda":
        parser.error("--llama7b-set refines 32 x 7 LLaMA-7B sublayers (~13 GB of fp16 weights): "
                     "it needs --device cuda")
    patterns = [p.strip() for p in args.patterns.split(",")]
    for pattern in patterns:
        try:
            dk.RefineConfig(sparsity=args.sparsity, pattern=pattern).validate()
        except (TypeError, ValueError) as exc:
            parser.error(f"--patterns {pattern!r} / --sparsity {args.sparsity}: {exc}")
    if args.backends:
        for name in (b.strip() for b in args.backends.split(",")):
            if name not in dk.BACKENDS + ("auto",):
                parser.error(f"--backends: expected a comma list of auto, {', '.join(dk.BACKENDS)}, got {name!r}")
            for pattern in patterns if name != "auto" else ():
                reason = unavailable_reason(name, args.device, dk.parse_pattern(pattern)[1] > 0)
                if reason is not None:
                    parser.error(f"--backends {name} cannot run {pattern} on {args.device}: {reason}")
    if variants:
        try:
            from dsnot_kernels.ops import refine_triton
        except Exception as exc:  # noqa: BLE001 - any import failure means no triton rows
            parser.error(f"--triton-variants needs the triton backend ({type(exc).__name__}: {exc})")
        knobs = set(inspect.signature(refine_triton).parameters) - {"problem"}
        for variant in variants:
            unknown = sorted(set(variant) - knobs)
            if unknown:
                parser.error(f"--triton-variants: unknown knob(s) {', '.join(unknown)}; "
                             f"refine_triton takes {', '.join(sorted(knobs))}")


def variant_name(knobs: dict) -> str:
    return "triton[" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]"


# --------------------------------------------------------------------------------------------
# the LLaMA-7B set (CUDA)
# --------------------------------------------------------------------------------------------
def llama7b_set(device: str, backend: str, pattern: str, sparsity: float, repeats: int) -> dict:
    """Refine 32 layers x 7 sublayers of LLaMA-7B shapes; groups sharing an input go together."""
    hidden, inter, layers = 4096, 11008, 32
    attn_stats = make_problem(1, hidden, device, seed=1)[1]
    down_stats = make_problem(1, inter, device, seed=2)[1]
    groups = []
    for layer in range(layers):
        g = torch.Generator(device=device).manual_seed(layer)
        w = lambda o, i: (torch.randn(o, i, generator=g, device=device) * 0.02).half()  # noqa: E731
        groups.append(([w(hidden, hidden) for _ in range(3)], attn_stats))       # q, k, v
        groups.append(([w(hidden, hidden)], attn_stats))                         # o (input: attention output)
        groups.append(([w(inter, hidden) for _ in range(2)], attn_stats))        # gate, up
        groups.append(([w(hidden, inter)], down_stats))                          # down
    cfg = dk.RefineConfig(sparsity=sparsity, pattern=pattern)

    def run_all():
        for weights, stats in groups:
            dk.refine_many(weights, stats, cfg, backend=backend)

    median, times = time_call(run_all, device, repeats=repeats, warmup=1)
    return {"seconds": median, "times": times, "sublayers": 7 * layers,
            "weights": sum(w.numel() for ws, _ in groups for w in ws)}


def triton_tuned_launches() -> list:
    """What ``select="auto"`` of the triton backend chose in this run (empty without CUDA)."""
    if "dsnot_kernels.ops" not in sys.modules:
        return []
    from dsnot_kernels.ops import launch_tuning
    return launch_tuning.tuned_launches()


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default=None,
                        help="comma list OUTxIN (default: LLaMA-7B shapes); 'none' with --llama7b-set "
                             "times only the set")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.6, help="for unstructured")
    parser.add_argument("--backends", default=None, help="comma list (default: every available one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--memory", choices=["none", "first", "all"], default="first",
                        help="measure peak extra memory for no / the first / all shapes")
    parser.add_argument("--llama7b-set", action="store_true", help="also time the whole LLaMA-7B set (CUDA)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (interpreter smoke mode)")
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<machine>)")
    parser.add_argument("--triton-variants", default=None,
                        help="also time the triton backend with launcher knobs, side by side: "
                             "'queue_search=serial;select=rows' (each ';' part is one extra row "
                             "named triton[...], also in the LLaMA-7B set)")
    args = parser.parse_args(argv)
    variants = parse_variants(args.triton_variants)
    variant_knobs = {variant_name(k): k for k in variants}        # extra row name -> knobs

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    check_arguments(parser, args, variants)
    if args.smoke:
        args.repeats, args.memory = 1, "none"
    if args.shapes == "none":
        if not args.llama7b_set:
            parser.error("--shapes none measures nothing without --llama7b-set")
        shapes = []
    elif args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            parser.error(f"--shapes: expected a comma list of OUTxIN (e.g. 4096x4096,11008x4096) "
                         f"or 'none', got {args.shapes!r}")
    else:
        shapes = SMOKE_SHAPES if args.smoke else LLAMA7B_SHAPES
    patterns = [p.strip() for p in args.patterns.split(",")]
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    machine = machine_name(args.device)
    bandwidth = copy_bandwidth(args.device)
    print(f"machine: {machine}; torch {torch.__version__}; device copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    out_dir = Path(args.out) if args.out else RESULTS / machine
    stem = "bench_refine_smoke" if args.smoke else "bench_refine"
    rows = []
    summary = {"machine": machine, "device": args.device, "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "copy_bandwidth_GBps": bandwidth / 1e9, "complete": False, "rows": rows}

    def save(complete: bool = False) -> None:
        # after every measurement: a run stopped by a time limit keeps what it measured
        summary["complete"] = complete
        summary["triton_tuned_launches"] = triton_tuned_launches()
        write_results_atomic(out_dir, stem, summary, rows)

    for pattern in patterns:
        names = backends or [n for n, ok in dk.available_backends(args.device, pattern).items() if ok is True]
        # the reference runs first: every other row is checked against it and timed relative to it
        names = ["reference"] + [n for n in names if n != "reference"]
        if "triton" in names:
            names += list(variant_knobs)
        for si, (out_f, in_f) in enumerate(shapes):
            weight, stats = make_problem(out_f, in_f, args.device)
            cfg = dk.RefineConfig(sparsity=args.sparsity, pattern=pattern)
            bytes_moved = weight.numel() * weight.element_size() + 3 * in_f * 4 + weight.numel()
            reference = None
            for name in names:
                holder = {}

                knobs = variant_knobs.get(name)

                def run(name=name, knobs=knobs):
                    if knobs is None:
                        holder["res"] = dk.refine(weight, stats, cfg, backend=name)
                    else:
                        with triton_knobs(knobs):
                            holder["res"] = dk.refine(weight, stats, cfg, backend="triton")
                reps = args.reference_repeats if name == "reference" else args.repeats
                warm = 0 if name == "reference" and args.device == "cpu" else 1   # GPU: load kernels first
                median, times = time_call(run, args.device, reps, warmup=warm)
                res = holder["res"]
                if name == "reference":
                    reference = res
                    ref_seconds = median
                memory = None
                if knobs is None and (args.memory == "all" or (args.memory == "first" and si == 0)):
                    memory = peak_extra_memory(out_f, in_f, args.device, name, pattern, args.sparsity)
                row = {
                    "machine": machine, "device": args.device, "torch": torch.__version__,
                    "shape": f"{out_f}x{in_f}", "dtype": "fp16", "pattern": pattern,
                    "sparsity": round(res.sparsity, 4), "backend": name, "seconds": median,
                    "speedup_vs_reference": ref_seconds / median,
                    "bandwidth_GBps": bytes_moved / median / 1e9,
                    "fraction_of_copy_bw": bytes_moved / median / bandwidth,
                    "peak_extra_bytes_per_weight": None if memory is None else memory / weight.numel(),
                    "mean_swaps": float(res.swaps.float().mean()),
                    "matches_reference": outputs_agree(reference, res),
                    "times": times,
                }
                rows.append(row)
                save()
                mem = "" if memory is None else f"{memory / weight.numel():6.1f} B/w"
                print(f"{row['shape']:>11} {pattern:>12} {name:>10} {median * 1e3:11.2f} ms "
                      f"x{row['speedup_vs_reference']:8.1f} {row['fraction_of_copy_bw'] * 100:6.2f}% bw "
                      f"{mem:>10} swaps {row['mean_swaps']:5.1f} match={row['matches_reference']}", flush=True)
            del weight, stats

    if args.llama7b_set:
        for pattern in patterns:
            for knobs in [None] + variants:
                backend = "auto" if knobs is None else "triton"
                with triton_knobs(knobs or {}):
                    result = llama7b_set(args.device, backend, pattern, args.sparsity, repeats=3)
                result["pattern"] = pattern
                result["backend"] = backend if knobs is None else variant_name(knobs)
                summary.setdefault("llama7b_set", []).append(result)
                save()
                print(f"LLaMA-7B set ({result['sublayers']} sublayers, {pattern}, "
                      f"backend={result['backend']}): {result['seconds'] * 1e3:.1f} ms", flush=True)

    save(complete=True)
    if summary["triton_tuned_launches"]:
        print("triton select launches tuned by select='auto' (each candidate's time per run, ms):")
        for entry in summary["triton_tuned_launches"]:
            print("  " + format_tuned(entry))
    print(f"wrote {out_dir / (stem + '.json')} and .csv")
    return 0 if all(r["matches_reference"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

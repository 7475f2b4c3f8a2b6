"""``make demo``: dense vs Wanda vs Wanda + DSnoT at 60% unstructured on the packaged SmolLM2.

Runs the same pipeline as ``dsnot-prune`` (in one process, so the model is loaded from the
safetensors cache each time) and prints a table of perplexities and times. Settings are small
so that it finishes in a few minutes on a 2-core CPU; the equivalent commands are printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from .models import DriverError
from .pipeline import DEFAULT_PRESET, PruneArgs, run

DEMO = dict(model="smollm2", sparsity=0.6, pattern="unstructured", init="wanda", nsamples=32, seqlen=256,
            eval_windows=40, batch_size=8, dataset="news", seed=0)


def _command(args: PruneArgs, extra: str = "") -> str:
    return (f"dsnot-prune --model {args.model} --sparsity {args.sparsity} --init {args.init} --nsamples {args.nsamples} "
            f"--seqlen {args.seqlen} --eval-windows {args.eval_windows} --batch-size {args.batch_size}"
            f" --device {args.device} --backend {args.backend}{extra}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsnot_prune.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=DEMO["nsamples"])
    p.add_argument("--seqlen", type=int, default=DEMO["seqlen"])
    p.add_argument("--eval-windows", type=int, default=DEMO["eval_windows"])
    p.add_argument("--sparsity", type=float, default=DEMO["sparsity"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--preset", action="append", choices=("original", "robust"), default=None,
                   help=f"DSnoT preset(s) to show, one row each (default: {DEFAULT_PRESET}); repeat for several")
    ns = p.parse_args(argv)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = dict(DEMO, nsamples=ns.nsamples, seqlen=ns.seqlen, eval_windows=ns.eval_windows, sparsity=ns.sparsity,
                device=device, backend=ns.backend, progress=True, quiet=False)
    start = time.perf_counter()
    presets = ns.preset or [DEFAULT_PRESET]
    wanda_args = PruneArgs(**base, refine=False, eval_dense=True)
    dsnot_args = [PruneArgs(**base, refine=True, preset=name) for name in presets]
    print(f"DSnoT demo: SmolLM2-135M-Instruct (packaged, float32) on {device}, {ns.sparsity:.0%} unstructured, "
          f"torch threads {torch.get_num_threads()}\n"
          f"calibration: {ns.nsamples} samples x {ns.seqlen} tokens from news articles 0-149 (seed 0); "
          f"evaluation: {ns.eval_windows} windows x {ns.seqlen} tokens from the held-out articles 150-299\n"
          f"  same as: {_command(wanda_args, ' --no-refine --eval-dense')}"
          + "".join(f"\n           {_command(a, f' --preset {a.preset}')}" for a in dsnot_args), flush=True)
    try:
        wanda = run(wanda_args)
        dsnots = [run(a) for a in dsnot_args]
    except DriverError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start

    tw = wanda["timings"]
    rows = [("dense", wanda["ppl_dense"], None, None, tw["evaluation_dense"]),
            ("Wanda", wanda["ppl"], tw["pruning"], tw["refine"], tw["evaluation"])]
    for a, r in zip(dsnot_args, dsnots):
        name = "Wanda + DSnoT" + ("" if len(dsnots) == 1 else f" ({a.preset})")
        rows.append((name, r["ppl"], r["timings"]["pruning"], r["timings"]["refine"], r["timings"]["evaluation"]))
    width = max(14, *(len(r[0]) for r in rows))
    fmt = "| {:<%d} | {:>10} | {:>14} | {:>15} | {:>10} |" % width
    print()
    print(fmt.format("method", "perplexity", "pruning (s)", "of it DSnoT (s)", "eval (s)"))
    print("|" + "|".join("-" * (w + 2) for w in (width, 10, 14, 15, 10)) + "|")
    for name, ppl, prune_s, refine_s, eval_s in rows:
        print(fmt.format(name, f"{ppl:.2f}", "-" if prune_s is None else f"{prune_s:.1f}",
                         "-" if refine_s is None else f"{refine_s:.1f}", f"{eval_s:.1f}"))
    swaps = ", ".join(f"{r['mean_swaps_refined']:.1f} ({a.preset})" for a, r in zip(dsnot_args, dsnots))
    refined = "; ".join(f"{a.preset}: {', '.join(r['refined_sublayers']) or 'none'}"
                        + (f" (kept the Wanda mask: {', '.join(r['unrefined_sublayers'])})" if r["unrefined_sublayers"] else "")
                        for a, r in zip(dsnot_args, dsnots))
    print(f"\n{wanda['sparsity']:.1%} of the decoder linear weights are zero; DSnoT refined {refined}; "
          f"mean swaps per refined row: {swaps}; backend {', '.join(dsnots[0]['backends'])}.")
    print(f"pruning = calibration capture + statistics pass + initial masks + DSnoT + pruned pass; "
          f"demo wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

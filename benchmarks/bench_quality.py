"""Does DSnoT make a sparse model better? Perplexity of the packaged model, with and without DSnoT.

For every initial method (magnitude / Wanda / SparseGPT) and sparsity target (50/60/70%
unstructured, 2:4, 4:8) it prunes the model with the initial mask alone and with each DSnoT
variant, and evaluates perplexity on the held-out text. Each run also records the per-sublayer
output error on the calibration data (``--output-error``: mean and mean square of the output
difference to the dense sublayer, for the initial mask and for the refined one), which shows
*why* a variant helps or hurts. Results: a printed table, CSV (long format), JSON and a PNG plot
of perplexity against sparsity under ``benchmarks/results/<machine>/``.

    python benchmarks/bench_quality.py                                  # the full grid (GPU: minutes; CPU: hours)
    python benchmarks/bench_quality.py --inits wanda --targets 0.6 --variants none,original,robust

Variants (``--variants``):
    none            the initial mask only (the baseline)
    original        the published settings (T=50, τ=0.1, p=1, sign check per SPEC), MLP skipped
    original-all    the published settings, every sublayer refined
    original-sign   the published settings with the sign check on, MLP skipped
    robust          RefineConfig.robust(): swaps must lower |e| and the squared-error estimate,
                    every sublayer refined
    robust-attn     the robust checks, MLP skipped
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))   # run from a checkout
from dsnot_prune.pipeline import DriverError, PruneArgs, check_model, load, run  # noqa: E402
from bench_common import machine_name, write_results_atomic  # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "none": dict(refine=False),
    "original": dict(preset="original", skip="mlp"),
    "original-all": dict(preset="original", skip="none"),
    "original-sign": dict(preset="original", skip="mlp", sign_check=True),
    "robust": dict(preset="robust", skip="none"),
    "robust-attn": dict(preset="robust", skip="mlp"),
}


def _target(text: str):
    """``"0.6"`` -> 60% unstructured; ``"2:4"`` -> N:M."""
    return ("unstructured", float(text)) if ":" not in text else (text, None)


def _sublayer_summary(report: dict) -> dict:
    """Mean over all pruned sublayers of the output errors, initial mask vs final mask."""
    subs = [s for s in report.get("sublayers", []) if "out_mse_initial" in s]
    out = {}
    for key in ("out_mse_initial", "out_mse_final", "out_mean_sq_initial", "out_mean_sq_final"):
        vals = [s[key] for s in subs]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
        return False
    inits = sorted({r["init"] for r in rows})
    fig, axes = plt.subplots(1, len(inits), figsize=(5 * len(inits), 4), squeeze=False)
    for ax, init in zip(axes[0], inits):
        for variant in VARIANTS:
            pts = sorted((r["sparsity"], r["ppl"]) for r in rows
                         if r["init"] == init and r["variant"] == variant and r["pattern"] == "unstructured")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
            nm = [(r["pattern"], r["ppl"]) for r in rows
                  if r["init"] == init and r["variant"] == variant and r["pattern"] != "unstructured"]
            for pattern, ppl in nm:
                ax.scatter([0.5], [ppl], marker="x")
                ax.annotate(f"{pattern} {variant}", (0.5, ppl), fontsize=6)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("perplexity (held-out text)")
        ax.set_title(init)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return True


def write_results(rows, out_dir: Path, device: str, settings: dict, seconds: float, final: bool) -> None:
    """JSON + CSV (rewritten after every run, so an interrupted sweep keeps what it measured);
    the PNG at the end. Each file goes to a temporary name first, then is renamed."""
    meta = {"machine": machine_name(device), "device": device, "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "complete": final,
            "settings": {k: v for k, v in settings.items() if k not in ("progress", "quiet")},
            "seconds": seconds, "rows": rows}
    write_results_atomic(out_dir, "bench_quality", meta, rows)
    if final:
        plot(rows, out_dir / "bench_quality.png")
        print(f"wrote {out_dir}/bench_quality.{{json,csv,png}} in {seconds:.0f} s")


def check_grid_on_model(p: argparse.ArgumentParser, grid: list):
    """Load the model once and make every grid entry's model checks (an N:M pattern whose M
    does not divide a sublayer's width, a --seqlen past its positions) before the first run,
    not hours into the sweep. Returns ``(model, tokenizer)``."""
    try:
        model, tokenizer = load(PruneArgs(**grid[0][-1]))
    except DriverError as exc:
        p.error(f"--model: {exc}")
    for init, target, variant, _, settings in grid:
        try:
            check_model(model, PruneArgs(**settings))
        except DriverError as exc:
            p.error(f"--inits {init!r} / --targets {target!r} / variant {variant!r}: {exc}")
    return model, tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--inits", default="magnitude,wanda,sparsegpt")
    p.add_argument("--targets", default="0.5,0.6,0.7,2:4,4:8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sparsegpt-variants", default="none,original,robust",
                   help="variants run for init=sparsegpt (its column loop makes each run slower)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="default: every window of the held-out text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-text", default=None)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--dataset", default="news")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [v.strip() for v in args.variants.split(",")]
    sparsegpt_variants = [v.strip() for v in args.sparsegpt_variants.split(",")]
    for option, names in (("--variants", variants), ("--sparsegpt-variants", sparsegpt_variants)):
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            p.error(f"{option}: unknown {unknown}; choose from {list(VARIANTS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: no CUDA device is visible")
    out_dir = Path(args.out) if args.out else RESULTS / machine_name(device)
    common = dict(model=args.model, nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                  batch_size=args.batch_size, device=device, backend=args.backend, dtype=args.dtype,
                  calib_text=args.calib_text, eval_text=args.eval_text, dataset=args.dataset,
                  progress=False, quiet=True, output_error=True)
    # the whole grid, checked before the first (slow) run: a bad entry fails now, not hours in
    grid = []
    for init in (i.strip() for i in args.inits.split(",")):
        for target in (t.strip() for t in args.targets.split(",")):
            try:
                pattern, sparsity = _target(target)
            except ValueError:
                p.error(f"--targets: expected sparsities (0.6) or N:M patterns (2:4), got {target!r}")
            for variant in (variants if init != "sparsegpt" else [v for v in variants if v in sparsegpt_variants]):
                settings = dict(common, init=init, pattern=pattern,
                                sparsity=0.5 if sparsity is None else sparsity, **VARIANTS[variant])
                try:
                    PruneArgs(**settings).refine_config()
                except DriverError as exc:
                    p.error(f"--inits {init!r} / --targets {target!r} / variant {variant!r}: {exc}")
                grid.append((init, target, variant, pattern, settings))
    if not grid:
        p.error("the grid is empty: no variant of --variants runs for these --inits "
                "(init=sparsegpt runs only --sparsegpt-variants)")
    model, tokenizer = check_grid_on_model(p, grid)
    rows, dense_ppl = [], None
    start = time.perf_counter()
    for init, target, variant, pattern, settings in grid:
        # the model loaded for the checks serves the first run (each run prunes its model)
        report = run(PruneArgs(**settings, eval_dense=dense_ppl is None), model, tokenizer)
        model = tokenizer = None
        dense_ppl = report.get("ppl_dense", dense_ppl)
        row = {"init": init, "pattern": pattern, "target": target, "variant": variant,
               "sparsity": round(report["sparsity"], 4), "ppl": report["ppl"], "ppl_dense": dense_ppl,
               "mean_swaps": report.get("mean_swaps_refined"),
               "refined": ",".join(report.get("refined_sublayers", [])),
               "refine_seconds": report["timings"]["refine"],
               "pruning_seconds": report["timings"]["pruning"], **_sublayer_summary(report)}
        rows.append(row)
        write_results(rows, out_dir, device, common, time.perf_counter() - start, final=False)
        print(f"{init:>9} {target:>4} {variant:>13}: ppl {row['ppl']:10.2f}  "
              f"(dense {dense_ppl:.2f}; swaps/row {row['mean_swaps'] or 0:.1f}; "
              f"out MSE {row['out_mse_initial'] or float('nan'):.3e} -> {row['out_mse_final'] or float('nan'):.3e})",
              flush=True)

    write_results(rows, out_dir, device, common, time.perf_counter() - start, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

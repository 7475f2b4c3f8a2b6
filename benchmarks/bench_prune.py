"""End-to-end pruning wall clock: Wanda alone vs Wanda + DSnoT with each available backend.

Two workloads, each run through the driver's layer-wise pipeline (``dsnot_prune``) in this one
process, every configuration on a fresh copy of the same dense model and the same calibration
samples:

- ``smollm2``: the packaged SmolLM2-135M-Instruct (30 layers, width 576) calibrated on the news
  text (needs the ``gguf`` package the first time, to build the safetensors cache);
- ``synthetic-llama``: a randomly initialised model with LLaMA-7B layer shapes (hidden 4096,
  MLP 11008, 32 heads; ``--synthetic-layers`` layers, fp16), calibrated on random token ids.
  Run by default on CUDA only (on a CPU it takes minutes per layer; force it with ``--synthetic``).

Each configuration is warmed up first on one batch (default on CUDA: Triton JIT, CUDA context).
Per run the driver's stage timings are recorded (calibration capture, statistics pass,
initial masks, DSnoT refine, pruned pass); a hash of all pruned masks checks that every
backend produced the same model. Results: a printed table, a long-format CSV, JSON and (when
matplotlib is installed) a PNG stacked-bar chart under ``benchmarks/results/<machine>/``.

    python benchmarks/bench_prune.py --device cpu                      # SmolLM2 on this CPU
    python benchmarks/bench_prune.py --device cuda                     # SmolLM2 if cached + synthetic LLaMA
    python benchmarks/bench_prune.py --device cuda --no-smollm2 --synthetic-layers 4 --patterns unstructured,2:4
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

import dsnot_kernels as dk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))   # running from a checkout
from dsnot_prune import data as data_mod  # noqa: E402
from dsnot_prune.models import DriverError, find_decoder_layers, find_linears, load_model, parse_skip  # noqa: E402
from dsnot_prune.pipeline import PruneArgs, prune_model, resolve_device  # noqa: E402
from bench_common import machine_name, write_results_atomic  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"
PRUNE_STAGES = ("calibration", "statistics", "initial_masks", "refine", "propagation")


def mask_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every decoder linear's zero pattern, in layer order."""
    h = hashlib.sha1()
    _, layers = find_decoder_layers(model)
    for layer in layers:
        for name, lin in find_linears(layer).items():
            h.update(name.encode())
            h.update((lin.weight.detach() == 0).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def synthetic_llama(layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.config.use_cache = False
    return model


def backends_for(device: torch.device, pattern: str, wanted: Optional[List[str]]) -> Dict[str, str]:
    """Backend -> "" if it can run, else the reason it cannot."""
    avail = dk.available_backends(device, pattern)
    names = wanted or list(avail)
    return {name: ("" if avail.get(name) is True else str(avail.get(name, "unknown backend"))) for name in names}


def run_workload(name: str, model, samples: torch.Tensor, args, device: torch.device, machine: str) -> List[dict]:
    rows = []
    for pattern in args.patterns:
        configs = [("wanda", "auto", False)]
        for backend, reason in backends_for(device, pattern, args.backends).items():
            if reason:
                print(f"  [{name} {pattern}] backend {backend}: skipped ({reason})")
                continue
            configs.append(("wanda+dsnot", backend, True))
        for method, backend, refine in configs:
            pargs = PruneArgs(model=name, sparsity=args.sparsity, pattern=pattern, refine=refine, skip=args.skip,
                              nsamples=samples.shape[0], seqlen=samples.shape[1], batch_size=args.batch_size,
                              device=str(device), backend=backend, progress=False, quiet=True)
            cfg = pargs.refine_config()
            if args.warmup:   # JIT compilation (Triton), CUDA context, allocator: not part of the timing
                prune_model(copy.deepcopy(model), samples[: args.batch_size], pargs, cfg, device, {})
            runs = []
            for _ in range(args.repeats):
                work = copy.deepcopy(model)
                timings: Dict[str, float] = {}
                report = prune_model(work, samples, pargs, cfg, device, timings)
                timings["pruning"] = sum(timings[s] for s in PRUNE_STAGES)
                runs.append((timings["pruning"], timings, report, mask_digest(work)))
                del work
            runs.sort(key=lambda r: r[0])
            _, timings, report, digest = runs[len(runs) // 2]     # the run with the median pruning time
            if len({r[3] for r in runs}) > 1:
                print(f"  WARNING: repeated runs gave different masks: {[r[3] for r in runs]}")
            row = {"machine": machine, "device": str(device), "workload": name, "pattern": pattern,
                   "sparsity": args.sparsity, "method": method, "backend": ",".join(report["backends"]),
                   "requested_backend": backend, "skip": args.skip, "repeats": args.repeats, "nsamples": int(samples.shape[0]),
                   "seqlen": int(samples.shape[1]), "mean_swaps_refined": report["mean_swaps_refined"],
                   "mask_digest": digest, "timings": timings, "torch": torch.__version__,
                   "dsnot_kernels": dk.__version__, "date": dt.datetime.now().isoformat(timespec="seconds")}
            rows.append(row)
            print(f"  {name:16s} {pattern:12s} {method:12s} {row['backend']:10s} pruning {timings['pruning']:8.2f} s"
                  f"  (stats {timings['statistics']:.2f}, masks {timings['initial_masks']:.2f}, "
                  f"refine {timings['refine']:.2f}, propagate {timings['propagation']:.2f})  masks {digest}",
                  flush=True)
        refined = {r["mask_digest"] for r in rows if r["pattern"] == pattern and r["workload"] == name
                   and r["method"] == "wanda+dsnot"}
        if len(refined) > 1:
            print(f"  WARNING [{name} {pattern}]: backends produced different masks: {sorted(refined)}")
    return rows


def write_results(rows: List[dict], out_dir: Path) -> None:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    keys = [k for k in rows[0] if k != "timings"]
    stage_rows = [{**{k: r[k] for k in keys}, "stage": stage, "seconds": f"{seconds:.6f}"}
                  for r in rows for stage, seconds in r["timings"].items()]
    stem = f"bench_prune-{stamp}"
    write_results_atomic(out_dir, stem, rows, stage_rows)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    print(f"wrote {csv_path} and {json_path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG chart (pip install matplotlib)")
        return
    groups = sorted({(r["workload"], r["pattern"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
    for ax, (workload, pattern) in zip(axes[0], groups):
        sel = [r for r in rows if (r["workload"], r["pattern"]) == (workload, pattern)]
        labels = [r["method"] if r["method"] == "wanda" else f"+DSnoT\n{r['backend']}" for r in sel]
        bottom = [0.0] * len(sel)
        for stage in PRUNE_STAGES:
            vals = [r["timings"][stage] for r in sel]
            ax.bar(labels, vals, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{workload}, {pattern}")
        ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"layer-wise pruning wall clock on {rows[0]['machine']}")
    fig.tight_layout()
    png = out_dir / f"bench_prune-{stamp}.png"
    tmp = out_dir / f".bench_prune-{stamp}.png.tmp"         # then renamed: never a half-written PNG
    fig.savefig(tmp, dpi=120, format="png")
    tmp.replace(png)
    print(f"wrote {png}")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options before the model loads (``parser.error``: exit 2, the option named)."""
    try:
        resolve_device(args.device)             # cpu, cuda or cuda:N of a visible GPU
    except DriverError as exc:
        parser.error(str(exc))
    for option in ("repeats", "nsamples", "seqlen", "batch_size", "synthetic_layers", "synthetic_nsamples",
                   "synthetic_seqlen"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if not args.patterns:
        parser.error("--patterns must name at least one pattern")
    for pattern in args.patterns:
        try:
            PruneArgs(pattern=pattern, sparsity=args.sparsity).refine_config()
            parse_skip(args.skip)
        except DriverError as exc:
            parser.error(f"--patterns {pattern!r} / --sparsity / --skip: {exc}")
    for name in args.backends or []:
        if name not in dk.BACKENDS:
            parser.error(f"--backends: expected a comma list of {', '.join(dk.BACKENDS)}, got {name!r}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patterns", default="unstructured", help="comma-separated, e.g. unstructured,2:4")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--backends", default=None, help="comma-separated backends for DSnoT (default: every available)")
    p.add_argument("--skip", default="mlp", help="driver skip policy ('mlp' = the original's; 'none' refines all)")
    p.add_argument("--smollm2", dest="smollm2", action="store_true", default=True)
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false")
    p.add_argument("--nsamples", type=int, default=16, help="SmolLM2 calibration samples")
    p.add_argument("--seqlen", type=int, default=256, help="SmolLM2 calibration sample length")
    p.add_argument("--synthetic", dest="synthetic", action="store_true", default=None,
                   help="also the synthetic LLaMA-7B-shaped model (default: on CUDA only)")
    p.add_argument("--no-synthetic", dest="synthetic", action="store_false")
    p.add_argument("--synthetic-layers", type=int, default=2)
    p.add_argument("--synthetic-nsamples", type=int, default=128)
    p.add_argument("--synthetic-seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the median-time run is kept")
    p.add_argument("--warmup", dest="warmup", action="store_true", default=None,
                   help="run each configuration once on one batch before timing it (default: on CUDA)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<machine>)")
    args = p.parse_args(argv)
    args.patterns = [s.strip() for s in args.patterns.split(",") if s.strip()]
    args.backends = [s.strip() for s in args.backends.split(",")] if args.backends else None
    check_arguments(p, args)
    device = torch.device(args.device)
    machine = machine_name(args.device)
    synthetic = args.synthetic if args.synthetic is not None else device.type == "cuda"
    if args.warmup is None:
        args.warmup = device.type == "cuda"
    print(f"machine {machine}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"stages: {', '.join(PRUNE_STAGES)}")
    rows: List[dict] = []
    if args.smollm2:
        try:
            model, tok, _ = load_model("smollm2", torch.float32 if device.type == "cpu" else torch.float16,
                                       log=lambda m: print(m, flush=True))
            plan = data_mod.plan_text("news", None, None)
            samples = data_mod.calibration_tokens(plan, tok, args.nsamples, args.seqlen, 0)
        except DriverError as exc:
            print(f"SmolLM2 skipped: {exc}")
        else:
            print(f"smollm2: {args.nsamples} x {args.seqlen} calibration tokens from the news text")
            rows += run_workload("smollm2", model, samples, args, device, machine)
            del model
    if synthetic:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        model = synthetic_llama(args.synthetic_layers, dtype)
        gen = torch.Generator().manual_seed(0)
        samples = torch.randint(0, model.config.vocab_size, (args.synthetic_nsamples, args.synthetic_seqlen),
                                generator=gen)
        print(f"synthetic-llama: {args.synthetic_layers} LLaMA-7B-shaped layers ({dtype}), "
              f"{args.synthetic_nsamples} x {args.synthetic_seqlen} random calibration tokens")
        rows += run_workload("synthetic-llama", model, samples, args, device, machine)
    if not rows:
        print("nothing was run")
        return 1
    write_results(rows, Path(args.out) if args.out else RESULTS / machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

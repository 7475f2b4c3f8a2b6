"""``dsnot-prune``: prune a transformers causal LM layer by layer with DSnoT and evaluate it.

    dsnot-prune --model smollm2 --sparsity 0.6                     # Wanda + DSnoT, packaged model/text
    dsnot-prune --model smollm2 --sparsity 0.6 --no-refine         # the Wanda baseline
    dsnot-prune --model ./my-llama --pattern 2:4 --init sparsegpt --save ./pruned --report r.json
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .data import DATASETS
from .models import DriverError
from .pipeline import DEFAULT_PRESET, PruneArgs, run, summary


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not to on/off switches (whose stored
    default reads backwards: ``--no-refine`` stores ``refine=True``), not where the default is
    None (the help says what happens then), not where the help already names its default."""

    def _get_help_string(self, action):
        if (isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or action.default is None or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = PruneArgs()
    p = argparse.ArgumentParser(prog="dsnot-prune", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help="'smollm2' (the packaged SmolLM2-135M-Instruct), a local Hugging Face directory, or a hub id")
    g.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
                   help="weights/activations dtype; auto = float32 on CPU, on CUDA the checkpoint's "
                        "float16/bfloat16 (float16 for a float32 checkpoint)")
    g.add_argument("--device", default=d.device, help="compute device (default: cuda if available, else cpu); "
                   "layers stay on the CPU and visit it one at a time")

    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=float, default=d.sparsity,
                   help="fraction pruned per row (unstructured; N:M fixes its own)")
    g.add_argument("--pattern", default=d.pattern, help="'unstructured' or N:M (N pruned of every M), e.g. 2:4")
    g.add_argument("--init", default=d.init, choices=("wanda", "magnitude", "sparsegpt"), help="initial mask")
    g.add_argument("--no-refine", dest="refine", action="store_false",
                   help="keep the initial masks (the baseline without DSnoT)")
    g.add_argument("--preset", default=None, choices=("original", "robust"),
                   help=f"DSnoT settings: the published ones, or swaps that must also lower |e| and the "
                        f"squared-error estimate (default: {DEFAULT_PRESET} for unstructured, original for "
                        f"N:M, which measured better there; with --init sparsegpt and neither --preset nor "
                        f"--max-cycle-time, SparseGPT's masks are kept: DSnoT after it measured worse)")
    g.add_argument("--max-cycle-time", type=int, default=None, help="cycles per row T (preset: 50)")
    g.add_argument("--update-threshold", type=float, default=None, help="stop a row once |e| <= tau (preset: 0.1)")
    g.add_argument("--pow-of-var-regrowing", type=float, default=None, help="p in G = D / V^p (preset: 1)")
    g.add_argument("--sign-check", dest="sign_check", action="store_true", default=None,
                   help="stop a row at a swap that flips its error's sign (default: on for N:M, off for unstructured)")
    g.add_argument("--no-sign-check", dest="sign_check", action="store_false")
    g.add_argument("--skip", default=d.skip,
                   help="sublayers that keep their initial mask: 'mlp' (the original's), 'attn', 'none', "
                        "or comma-separated name parts (e.g. 'mlp,o_proj'); default: the preset's "
                        "(original: mlp, robust: none)")
    g.add_argument("--backend", default=d.backend, help="dsnot_kernels backend: auto, torch, triton, ext, reference")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=DATASETS,
                   help="news = the packaged news corpus (disjoint calibration/evaluation articles); "
                        "wikitext2/c4 need the 'datasets' package and the hub")
    g.add_argument("--calib-text", default=None, help="calibration text file (overrides --dataset)")
    g.add_argument("--eval-text", default=None, help="evaluation text file (overrides --dataset); "
                   "the same file as --calib-text is split in two halves")
    g.add_argument("--nsamples", type=int, default=d.nsamples, help="calibration samples")
    g.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per calibration sample and per evaluation window")
    g.add_argument("--seed", type=int, default=d.seed, help="calibration sampling seed")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward batch")
    g.add_argument("--eval-windows", type=int, default=None, help="evaluate on at most this many windows (default: all)")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip the perplexity evaluation")
    g.add_argument("--eval-dense", action="store_true", help="also measure the dense model's perplexity first")
    g.add_argument("--output-error", action="store_true",
                   help="report each sublayer's output error on the calibration data (mean square and squared "
                        "mean), for the initial and the final mask")

    g = p.add_argument_group("output")
    g.add_argument("--report", default=None, help="write the JSON report to this file (not inside --save)")
    g.add_argument("--save", default=None, help="save the pruned model (safetensors, in the run's --dtype) + "
                   "tokenizer + report to this new or empty directory")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def parse_args(argv: Optional[List[str]] = None) -> PruneArgs:
    ns = build_parser().parse_args(argv)
    return PruneArgs(**vars(ns))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except DriverError as exc:
        print(f"dsnot-prune: error: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.report:
        print(f"report: {args.report}")
    if args.save:
        print(f"saved: {report['saved_to']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

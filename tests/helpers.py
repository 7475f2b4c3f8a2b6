"""Problem generators and a verbose comparison used by the backend parity tests, and the tiny
text, tokenizer and whole-model perplexity of the driver tests (and ``benchmarks/arch_sweep.py``)."""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

import dsnot_kernels as dk
from dsnot_kernels.api import build_problem
from dsnot_kernels.reference import refine_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VOCAB = 320                 # the tiny models' vocabulary, and the tokenizer's most tokens
WORDS = ("the a of to in and model layer weight mask prune sparse error row column swap grow "
         "calibration token news market river city people said year government police fire").split()


def write_corpus(path: Path) -> str:
    """400 lines of random ``WORDS`` at ``path`` (the same each time); returns the path."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "."
             for _ in range(400)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def train_tokenizer(corpus: str):
    """A byte-level BPE tokenizer of at most ``VOCAB`` tokens (``<eos>`` among them) trained on ``corpus``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train([corpus], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.model_max_length = int(1e12)
    return fast


@torch.no_grad()
def whole_model_ppl(model, windows: torch.Tensor, batch_size: int) -> float:
    """``exp`` of the mean over ``windows`` [n, seq] of each window's mean next-token NLL, from
    plain whole-model forwards (what the driver's layer-by-layer perplexity must equal)."""
    nlls = []
    for ids in torch.split(windows, batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="none").view(target.shape)
        nlls += loss.mean(1).double().tolist()
    return math.exp(sum(nlls) / len(nlls))


def make_layer(out_features: int, in_features: int, dtype=torch.float32, seed: int = 0,
               nsamples: int = 4, seq: int = 32, hessian: bool = False):
    """A random dense weight ``[out, in]`` and real statistics of random inputs.

    Inputs get per-channel offsets and scales so that ``S`` has both signs and ``V`` varies:
    with continuous random values, score ties are improbable (Wanda and D scores mix a
    weight with a per-column factor, so equal fp16 weights still give distinct scores).
    """
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    offset = torch.randn(in_features, generator=gen) * 0.5
    scale = torch.rand(in_features, generator=gen) + 0.25
    x = torch.randn(nsamples, seq, in_features, generator=gen) * scale + offset
    acc = dk.StatsAccumulator(in_features, hessian=hessian)
    acc.update(x)
    return weight, acc.finalize()


def non_finite_growth_layer(pattern: str, seed: int = 11):
    """A layer, its statistics and a config whose growth scores ``G`` hold +-inf and NaN.

    Every fourth channel has zero variance; with ``p = 4``, ``V^p = TINY^4`` underflows to 0,
    so ``G = D / 0`` is +-inf, and NaN where ``S = 0`` too (``D = 0``). NaN is in no queue
    (neither ``G > 0`` nor ``G < 0``); every backend must agree on that and order the
    infinities as floats.
    """
    from dataclasses import replace
    weight, stats = make_layer(12, 64, torch.float32, seed=seed)
    var = stats.var.clone()
    var[::4] = 0.0
    sums = stats.sum_metric_row.clone()
    sums[8::16] = 0.0
    stats = replace(stats, var=var, sum_metric_row=sums)
    cfg = dk.RefineConfig(sparsity=0.5, pattern=pattern, max_cycle_time=10, update_threshold=0.01,
                          pow_of_var_regrowing=4.0)
    problem, _ = build_problem(weight, stats, cfg)
    g = weight * problem.sum_metric_row / problem.var_pow
    assert bool(g.isinf().any()) and bool(g.isnan().any()), "the layer needs infinite and NaN scores"
    return weight, stats, cfg


def reference_output(weight, stats, cfg, initial_mask=None):
    problem, _ = build_problem(weight, stats, cfg, initial_mask)
    return problem, refine_reference(problem)


def assert_same_output(expected, actual, label: str = "", error_rtol: float = 1e-5) -> None:
    """Masks and swaps equal, errors within ``error_rtol`` relative (DESIGN.md's rule 1)."""
    exp_mask, act_mask = expected[0].cpu(), actual[0].cpu()
    bad_rows = (exp_mask != act_mask).any(1).nonzero().flatten()
    if len(bad_rows):
        r = int(bad_rows[0])
        cols = (exp_mask[r] != act_mask[r]).nonzero().flatten().tolist()
        raise AssertionError(f"{label}: masks differ in {len(bad_rows)} rows; first row {r}, columns "
                             f"{cols[:10]}; swaps expected {int(expected[1][r])} got {int(actual[1][r])}")
    swaps_e, swaps_a = expected[1].cpu(), actual[1].cpu()
    if not torch.equal(swaps_e.to(torch.int64), swaps_a.to(torch.int64)):
        r = int((swaps_e != swaps_a).nonzero()[0])
        raise AssertionError(f"{label}: swaps differ, row {r}: expected {int(swaps_e[r])} got {int(swaps_a[r])}")
    for i, name in ((2, "error_before"), (3, "error_after")):
        e, a = expected[i].cpu().double(), actual[i].cpu().double()
        tol = error_rtol * e.abs()
        if not bool(((e - a).abs() <= tol).all()):
            r = int(((e - a).abs() - tol).argmax())
            raise AssertionError(f"{label}: {name} differs, row {r}: expected {float(e[r])} got {float(a[r])}")

"""The layer-wise DSnoT pipeline (SPEC §6): load -> calibrate -> per layer (statistics on the dense
layer, initial masks, DSnoT refinement, zero the pruned weights, propagate through the pruned
layer) -> evaluate -> report / save.

Stages (each timed; the names are the keys of ``report["timings"]``):

    load          model + tokenizer
    calibration   text -> calibration samples -> the first layer's inputs and every layer's
                  call arguments (captured once, with the KV cache off)
    statistics    per layer: one pass of the samples through the *dense* layer; forward
                  pre-hooks feed one dk.StatsAccumulator per distinct input tensor (q/k/v share
                  one, gate/up share one)
    initial_masks per group of sublayers sharing an input: the initial mask (dk.refine_many
                  with max_cycle_time=0)
    refine        DSnoT on the initial masks (dk.refine_many with initial_masks=...) for the
                  sublayers the skip policy does not skip
    propagation   the pruned layer's outputs for the samples (they feed the next layer)
    evaluation    perplexity after pruning (``evaluation_dense``: of the dense model, when asked)

Only the public ``dsnot_kernels`` API is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import dsnot_kernels as dk

from . import data as data_mod
from .layerwise import Captured, capture, perplexity, run_layer, sync
from .models import (DTYPES, ROUTER_REASON, DriverError, find_decoder_layers, find_linears, is_skipped,
                     load_model, matrix_shape, moe_routers, non_linear_weights, parse_skip, resolve_dtype,
                     sublayer_kind, timed, weight_matrix)

# The default DSnoT settings of dsnot-prune (--preset). "robust" because, measured on the packaged
# SmolLM2 (README, "DSnoT that helps"), it improves on the initial Wanda mask at every sparsity,
# where the published settings made 50/60/70% unstructured worse. The library's refine() keeps the
# published settings as its default (RefineConfig()), for fidelity to the paper.
# For N:M patterns the published settings measured better (2:4: 197.0 vs robust 224.7), so a run
# that names no --preset uses "original" there (PruneArgs.preset_name).
DEFAULT_PRESET = "robust"
# Which sublayers keep their initial mask when --skip is not given: the original skips the MLP;
# the robust checks only accept swaps that lower the error estimate, so every sublayer is refined.
PRESET_SKIP = {"original": "mlp", "robust": "none"}
STAGES = ("load", "calibration", "statistics", "initial_masks", "refine", "propagation", "evaluation")


@dataclass
class PruneArgs:
    """Everything a pruning run needs; the command-line flags map one to one onto these fields."""

    model: str = "smollm2"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    init: str = "wanda"
    refine: bool = True
    preset: Optional[str] = None                   # None = preset_name() picks by pattern (sparsegpt: no DSnoT)
    max_cycle_time: Optional[int] = None           # None = the preset's value
    update_threshold: Optional[float] = None
    pow_of_var_regrowing: Optional[float] = None
    sign_check: Optional[bool] = None              # None = SPEC default per pattern
    skip: Optional[str] = None                     # sublayers that keep their initial mask (None: the preset's)
    dataset: str = "news"
    calib_text: Optional[str] = None
    eval_text: Optional[str] = None
    nsamples: int = 128
    seqlen: int = 2048                             # the original's; CPU runs want less (make demo: 256)
    seed: int = 0
    eval_windows: Optional[int] = None             # None = every window of the evaluation text
    eval: bool = True
    eval_dense: bool = False
    output_error: bool = False                     # per-sublayer output error (initial vs final mask)
    batch_size: int = 4
    device: Optional[str] = None                   # None = cuda if available else cpu
    dtype: str = "auto"
    backend: str = "auto"
    report: Optional[str] = None
    save: Optional[str] = None
    progress: bool = True
    quiet: bool = False

    def preset_name(self) -> str:
        """``--preset`` as given, else ``DEFAULT_PRESET`` (unstructured) / ``"original"`` (N:M)."""
        if self.preset is not None:
            return self.preset
        return "original" if ":" in str(self.pattern) else DEFAULT_PRESET

    def skip_policy(self) -> str:
        """``--skip`` as given, else the preset's default (``PRESET_SKIP``)."""
        return self.skip if self.skip is not None else PRESET_SKIP.get(self.preset_name(), "mlp")

    def refine_config(self) -> dk.RefineConfig:
        """The :class:`dk.RefineConfig` of the run: the preset with the options given. Without
        ``--preset`` and ``--max-cycle-time``, ``--init sparsegpt`` keeps SparseGPT's masks for
        every pattern (DSnoT after SparseGPT measured worse: README, "DSnoT that helps")."""
        overrides: Dict[str, Any] = dict(sparsity=float(self.sparsity), pattern=self.pattern, init=self.init)
        for name in ("max_cycle_time", "update_threshold", "pow_of_var_regrowing", "sign_check"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if not self.refine or (self.init == "sparsegpt" and self.preset is None and self.max_cycle_time is None):
            overrides["max_cycle_time"] = 0
        try:
            return dk.RefineConfig.preset(self.preset_name(), **overrides).validate()
        except (TypeError, ValueError) as exc:
            raise DriverError(_flag_message(str(exc))) from exc


def _flag_message(message: str) -> str:
    """A ``RefineConfig`` error that starts with a field name, naming the command-line option
    instead (``max_cycle_time must be ...`` -> ``--max-cycle-time must be ...``)."""
    for field in ("max_cycle_time", "update_threshold", "pow_of_var_regrowing", "sign_check",
                  "sparsity", "pattern", "init", "preset"):
        if message.startswith(field + " "):
            return "--" + field.replace("_", "-") + message[len(field):]
    return message


# --------------------------------------------------------------------------------------------
# checks done before any work
# --------------------------------------------------------------------------------------------
def check_save_dir(path: Optional[str]) -> None:
    """``--save``: a new or empty directory in a directory this process can write to (probed by
    making and removing a temporary directory there, so the run cannot fail at its end)."""
    if path is None:
        return
    p = _resolved(path, "--save")   # a link saves where it points (save_model replaces that)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise DriverError(f"--save {path!r} exists and is not an empty directory; refusing to overwrite it")
    if p == Path.cwd().resolve():
        # the save replaces the directory by a new one: the shell would be left in a deleted one
        raise DriverError(f"--save {path!r} is the current directory: give a new directory path, "
                          f"e.g. --save ./pruned-model")
    parent = p.parent
    if not parent.is_dir():
        raise DriverError(f"--save {path!r}: parent directory {str(parent)!r} does not exist")
    _probe_writable(parent, f"--save {path!r}")


def _resolved(path: str, option: str) -> Path:
    """``path`` with its symbolic links followed (a loop is a clean error naming ``option``)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:      # RuntimeError: "Symlink loop" (Python < 3.13)
        raise DriverError(f"{option} {path!r}: cannot follow its symbolic links ({exc})") from exc


def check_report_path(path: Optional[str], save: Optional[str]) -> None:
    """``--report``: a file path (not a directory) whose directory exists or can be made, in a
    writable place, and not inside ``--save`` (which gets its own ``dsnot_report.json``)."""
    if path is None:
        return
    target = Path(path).absolute()
    if target.is_dir():
        raise DriverError(f"--report {path!r} is a directory: give a file path, e.g. {path.rstrip('/')}/report.json")
    if save is not None:
        saved, real = _resolved(save, "--save"), _resolved(str(target), "--report")   # through '..' and links
        if saved == real or saved in real.parents:
            raise DriverError(f"--report {path!r} lies inside --save {save!r}, which must be a new directory "
                              f"(the saved model gets its own dsnot_report.json there): put the report elsewhere")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DriverError(f"--report {path!r}: {str(existing)!r} is a file, not a directory")
    _probe_writable(existing, f"--report {path!r}")


def _probe_writable(directory: Path, what: str) -> None:
    try:
        tempfile.TemporaryDirectory(prefix=".dsnot-probe-", dir=directory).cleanup()
    except OSError as exc:
        raise DriverError(f"{what}: cannot write to {str(directory)!r} ({exc.strerror or exc})") from exc


def check_pattern(layers: nn.ModuleList, layers_name: str, cfg: dk.RefineConfig) -> None:
    """Every pruned sublayer's in_features must be a multiple of M (checked before pruning)."""
    n, m = cfg.nm
    if not m:
        return
    for i, layer in enumerate(layers):
        for name, lin in find_linears(layer).items():
            in_features = matrix_shape(lin)[1]
            if in_features % m:
                raise DriverError(f"--pattern {cfg.pattern}: M={m} does not divide in_features={in_features} "
                                  f"of {layers_name}.{i}.{name}; choose an M that divides every layer's width")


def check_weights(layers: nn.ModuleList, layers_name: str) -> None:
    """Every sublayer's weight holds float16/bfloat16/float32 values on a real device (checked
    before pruning: a quantized or offloaded model would otherwise fail at its first layer)."""
    for i, layer in enumerate(layers):
        for name, lin in find_linears(layer).items():
            weight = lin.weight
            if weight.device.type == "meta":
                raise DriverError(f"{layers_name}.{i}.{name}: its weight is on the meta device (offloaded, "
                                  f"e.g. by device_map='auto'): load the model whole on the CPU")
            if weight.dtype not in set(DTYPES.values()):
                hint = "load it in one of those" if weight.is_floating_point() else \
                    "a quantized model? load it unquantized"
                raise DriverError(f"{layers_name}.{i}.{name}: its weight is {str(weight.dtype).replace('torch.', '')}; "
                                  f"dsnot-prune prunes float32, float16 and bfloat16 weights ({hint})")


def check_skip(layers: nn.ModuleList, layers_name: str, skip: List[str]) -> None:
    """Every ``--skip`` name part must match a sublayer: a typo would refine what it meant to skip."""
    names = sorted({name for layer in layers for name in find_linears(layer)})
    for token in skip:
        if token not in ("mlp", "attn") and not any(token in name for name in names):
            raise DriverError(f"--skip {token!r} matches no sublayer of {layers_name}: its sublayers are "
                              f"{', '.join(names)} (or use mlp, attn, none)")


# --------------------------------------------------------------------------------------------
# one decoder layer
# --------------------------------------------------------------------------------------------
class _StatsHooks:
    """Forward pre-hooks that feed one StatsAccumulator per distinct input tensor of a layer.

    Sublayers whose input is the *same tensor object* in the first batch (q/k/v, gate/up)
    share an accumulator; identity, not address, is compared (a freed tensor's memory can be
    reused by a later input of the same shape).
    """

    def __init__(self, linears: Dict[str, nn.Module], hessian: bool):
        self.linears, self.hessian = linears, hessian
        self.group_of: Dict[str, int] = {}
        self.groups: List[Dict[str, Any]] = []      # {"acc", "members", "current"}
        self.unsupported: Dict[str, str] = {}
        self.batch_shape = (0, 0)
        self.first_batch = True
        self.handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def start_batch(self, tokens: Tuple[int, int]) -> None:
        """A new batch of ``tokens = (batch, seq)`` token ids (from the ids, not the hidden
        states: Gemma 3n passes its layers ``[4, batch, seq, hidden]``)."""
        self.batch_shape = tokens
        for g in self.groups:
            g["current"] = None

    def end_batch(self) -> None:
        self.first_batch = False
        for g in self.groups:
            g["current"] = None        # drop the references to this batch's activations

    def _hook(self, name: str):
        def hook(module, args):
            if name in self.unsupported or not args:
                return None
            x = args[0]
            b, s = self.batch_shape
            if x.dim() == 2 and x.shape[0] == b * s:
                xs = x.reshape(b, s, x.shape[-1])
            elif x.dim() >= 3 and x.shape[0] == b and x.shape[-2] == s and x[0].numel() == s * x.shape[-1]:
                xs = x.reshape(b, s, x.shape[-1])     # [b, seq, in], or [b, 1, seq, in] (MLA's kv_b_proj)
            else:   # e.g. routed MoE experts: not one row per token of each sequence
                self.unsupported[name] = (f"input of shape {tuple(x.shape)} is not one row per token of "
                                          f"the batch ({b} x {s} tokens); e.g. a routed MoE expert sees only its tokens")
                return None
            if not self.first_batch and name not in self.group_of:
                # its input's sharing (and its statistics) would miss the first batch
                self.unsupported[name] = "called in some calibration batches but not the first"
                return None
            if name not in self.group_of:
                for gi, g in enumerate(self.groups):
                    if g["current"] is x:
                        self.group_of[name] = gi
                        g["members"].append(name)
                        return None
                acc = dk.StatsAccumulator(int(x.shape[-1]), hessian=self.hessian)
                self.groups.append({"acc": acc, "members": [name], "current": None})
                self.group_of[name] = len(self.groups) - 1
            g = self.groups[self.group_of[name]]
            if g["current"] is x:
                return None
            if g["current"] is not None:     # a second input in one batch: which one would it be pruned for?
                self.unsupported[name] = ("called with different inputs in one forward pass, or with an input "
                                          "other sublayers shared in the first batch but not later")
                return None
            g["acc"].update(xs)
            g["current"] = x
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _output_error(dense: torch.Tensor, res: dk.RefineResult, stats: dk.LayerStats, tag: str) -> Dict[str, float]:
    """Output error of the pruned sublayer against the dense one on the calibration inputs.

    With ``Δ = W_dense − W_pruned`` and the inputs' Gram matrix ``Σ x xᵀ = H·N/2``:
    ``out_mse`` = mean over tokens and outputs of ``(Δx)²`` = ``trace(Δ Σxxᵀ Δᵀ) / (tokens·out)``;
    ``out_mean_sq`` = mean over outputs of the squared *mean* error ``(Δ S / L)²`` (the first
    moment, the part DSnoT's objective sees).
    """
    weight = res.updated_weight if res.updated_weight is not None else dense
    delta = dense.float() - weight.float().masked_fill(res.pruned_mask, 0.0)
    gram = stats.hessian.float() * (stats.nsamples / 2.0)
    mse = float(((delta @ gram) * delta).sum()) / (stats.ntokens * delta.shape[0])
    mean = delta @ stats.sum_metric_row.float() / (stats.ntokens / stats.nsamples)
    return {f"out_mse_{tag}": mse, f"out_mean_sq_{tag}": float((mean ** 2).mean())}


def _row_mean(t: torch.Tensor) -> float:
    return float(t.double().abs().mean()) if t.numel() else 0.0


def _ranges(indices: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: List[List[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _dense_entry(prefix: str, index: int, name: str, shape: List[int], reason: str) -> dict:
    """The report entry of a weight of layer ``index`` that the driver left dense."""
    return {"name": f"{prefix}.{index}.{name}", "layer": index, "sublayer": name,
            "kind": sublayer_kind(name), "shape": shape, "pruned": False, "refined": False,
            "reason": reason}


def _non_linear_entries(prefix: str, index: int, non_linear: Dict[str, Tuple[List[int], str]]) -> List[dict]:
    """Report entries of a layer's weight matrices that no linear sublayer holds (``non_linear_weights``)."""
    return [_dense_entry(prefix, index, name, shape, why) for name, (shape, why) in non_linear.items()]


def _dense_layer(prefix: str, index: int, linears: Dict[str, nn.Module],
                 non_linear: Dict[str, Tuple[List[int], str]], reason: str) -> List[dict]:
    """Report entries for every weight matrix of a layer the driver leaves whole (``reason``)."""
    return ([_dense_entry(prefix, index, name, matrix_shape(lin), reason)
             for name, lin in linears.items()] + _non_linear_entries(prefix, index, non_linear))


@torch.no_grad()
def prune_layer(index: int, prefix: str, layer: nn.Module, cap: Captured, cfg: dk.RefineConfig,
                skip: List[str], backend: str, device: torch.device, timings: Dict[str, float], *,
                linears: Dict[str, nn.Module], non_linear: Dict[str, Tuple[List[int], str]],
                output_error: bool = False, pruned_before: Optional[Dict[int, str]] = None) -> List[dict]:
    """Statistics on the dense layer, masks (+ DSnoT), zeroing, then the pruned pass. In place.
    ``linears`` and ``non_linear``: the layer's ``find_linears`` and ``non_linear_weights``
    (looked up once by :func:`prune_model`). ``pruned_before``: ``id(weight) -> name`` of
    weights an earlier layer pruned (a sublayer whose weight is tied to one of them keeps that
    mask: its entry has ``shared_with``)."""
    tied, first_of = {}, {}            # a weight met before (an earlier layer, or this one) -> its owner
    for name, lin in linears.items():
        key = id(lin.weight)
        if pruned_before and key in pruned_before:
            tied[name] = pruned_before[key]
        elif key in first_of:
            tied[name] = f"{prefix}.{index}.{first_of[key]}"
        else:
            first_of[key] = name
    clock = timed()
    hooks = _StatsHooks(linears, hessian=cfg.init == "sparsegpt" or output_error)
    hooks.unsupported.update({name: ROUTER_REASON for name in moe_routers(layer)})
    hooks.unsupported.update({name: f"its weight is tied to {owner}'s, pruned there" for name, owner in tied.items()})
    try:
        for b in range(len(cap.hidden)):
            hooks.start_batch(cap.tokens[b])
            run_layer(layer, cap.hidden[b], cap.calls[index][b])
            hooks.end_batch()
    finally:
        hooks.remove()
    sync(device)
    timings["statistics"] += clock()

    entries: List[dict] = []
    initial_cfg = dataclasses.replace(cfg, max_cycle_time=0)
    for gi, group in enumerate(hooks.groups):
        stats = group["acc"].finalize()
        for refined in (True, False):
            names = [n for n in group["members"] if n not in hooks.unsupported
                     and (cfg.max_cycle_time > 0 and not is_skipped(n, skip)) == refined]
            if not names:
                continue
            weights = [weight_matrix(linears[n]) for n in names]   # [out, in] (a view of a Conv1D's [in, out])
            dense = [w.detach().clone() for w in weights] if output_error else None
            clock = timed()
            if not refined or cfg.init == "sparsegpt":
                # One call: initial mask only, or SparseGPT (its weight update and mask) + DSnoT
                # together (exactly what refine() does; the time goes to initial_masks).
                results = dk.refine_many(weights, stats, cfg if refined else initial_cfg, backend=backend)
                sync(device)
                spent_init, spent_refine = clock(), 0.0
            else:
                initial = dk.refine_many(weights, stats, initial_cfg, backend=backend)
                sync(device)
                spent_init = clock()
                clock = timed()
                results = dk.refine_many(weights, stats, cfg, backend=backend,
                                         initial_masks=[r.pruned_mask for r in initial])
                sync(device)
                spent_refine = clock()
            timings["initial_masks"] += spent_init
            timings["refine"] += spent_refine
            rows = sum(w.shape[0] for w in weights)
            if output_error:   # outside the timed stages; SparseGPT's initial mask needs its own call
                initial = (results if not refined else
                           dk.refine_many(weights, stats, initial_cfg, backend=backend) if cfg.init == "sparsegpt"
                           else initial)
            for i, (name, weight, res) in enumerate(zip(names, weights, results)):
                errors = {}
                if output_error:
                    errors = {**_output_error(dense[i], initial[i], stats, "initial"),
                              **_output_error(dense[i], res, stats, "final")}
                dk.apply_mask_(weight, res)
                share = weight.shape[0] / rows
                entries.append({**errors,
                    "name": f"{prefix}.{index}.{name}", "layer": index, "sublayer": name,
                    "kind": sublayer_kind(name), "group": gi, "shape": list(weight.shape),
                    "sparsity": float((weight == 0).float().mean()),
                    "refined": refined, "backend": res.backend,
                    "mean_swaps": float(res.swaps.double().mean()),
                    "mean_abs_error_before": _row_mean(res.error_before),
                    "mean_abs_error_after": _row_mean(res.error_after),
                    "seconds": (spent_init + spent_refine) * share,
                })
    # what stays dense, each with its reason: linears whose input is not one row per token,
    # linears the calibration pass never reached, and weights that no linear sublayer holds
    unseen = {name: "no input reached it in the calibration pass (not called, or its input "
                    "passed by keyword)" for name in linears
              if name not in hooks.group_of and name not in hooks.unsupported}
    for name, reason in {**hooks.unsupported, **unseen}.items():
        entries.append(_dense_entry(prefix, index, name, matrix_shape(linears[name]), reason))
        if name in tied:
            entries[-1]["shared_with"] = tied[name]
    entries += _non_linear_entries(prefix, index, non_linear)

    clock = timed()
    for b in range(len(cap.hidden)):
        cap.hidden[b] = run_layer(layer, cap.hidden[b], cap.calls[index][b])
    sync(device)
    timings["propagation"] += clock()
    return entries


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------
def _log(args: PruneArgs):
    return (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def _progress(args: PruneArgs, desc: str):
    if not args.progress or args.quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda it: tqdm(it, desc=desc, unit="layer", file=sys.stderr)


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DriverError(f"--device {name!r} is not a torch device ({exc})") from exc
    if device.type not in ("cpu", "cuda"):
        raise DriverError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DriverError(f"--device {name}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DriverError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _check_backend(name: str, device: torch.device, pattern: str) -> None:
    if name == "auto":
        return
    avail = dk.available_backends(device, pattern)
    if name not in avail:
        raise DriverError(f"--backend must be 'auto' or one of {tuple(avail)}, got {name!r}")
    if avail[name] is not True:
        raise DriverError(f"--backend {name} cannot run on {device} for pattern {pattern}: {avail[name]}")


def prune_model(model: nn.Module, samples: torch.Tensor, args: PruneArgs, cfg: dk.RefineConfig,
                device: torch.device, timings: Dict[str, float]) -> Dict[str, Any]:
    """Prune ``model`` (on the CPU) in place, layer by layer, calibrated on ``samples``
    (int64 ``[nsamples, seqlen]`` token ids). Returns the pruning part of the report;
    ``timings`` (stage -> seconds) is added to."""
    layers_name, layers = find_decoder_layers(model)
    check_weights(layers, layers_name)
    check_pattern(layers, layers_name, cfg)
    skip = parse_skip(args.skip_policy())
    for stage in STAGES:
        timings.setdefault(stage, 0.0)
    # the decoder layers' weight matrices: the linears' weights and those no linear sublayer holds
    # (module.to() and apply_mask_ keep each Parameter object, so ids stay valid throughout)
    linears_of = [find_linears(layer) for layer in layers]
    non_linear_of = [non_linear_weights(layer) for layer in layers]
    linear_total = sum(w.numel() for w in {id(lin.weight): lin.weight for linears in linears_of
                                           for lin in linears.values()}.values())   # tied: once
    dense = sum(math.prod(shape) for found in non_linear_of for shape, _ in found.values())
    matrix_total = linear_total + dense
    not_linear = {name for found in non_linear_of for name in found}
    if not_linear:
        _log(args)(f"warning: {', '.join(sorted(not_linear))} ({dense / matrix_total:.1%} of the decoder "
                   f"layers' weights) are not linear sublayers and stay dense; the sparsity applies "
                   f"to the pruned sublayers only")

    clock = timed()
    cap = capture(model, layers, list(torch.split(samples, args.batch_size)), device)
    sync(device)
    timings["calibration"] += clock()

    entries: List[dict] = []
    pruned_before: Dict[int, str] = {}     # id(weight) -> the entry that pruned it (tied weights)
    progress = _progress(args, "pruning")
    for i in (progress(range(len(layers))) if progress else range(len(layers))):
        if cap.skipped(i):      # the model does not call it on text (Mllama's cross-attention layers)
            entries += _dense_layer(layers_name, i, linears_of[i], non_linear_of[i],
                                    "the model does not call this layer on text alone (e.g. a cross-attention layer)")
            continue
        clock = timed()
        layer = layers[i].to(device)
        timings["statistics"] += clock()      # moving the layer in counts with its dense pass
        new = prune_layer(i, layers_name, layer, cap, cfg, skip, args.backend, device, timings,
                          linears=linears_of[i], non_linear=non_linear_of[i],
                          output_error=args.output_error, pruned_before=pruned_before)
        pruned_before.update({id(linears_of[i][e["sublayer"]].weight): e["name"]
                              for e in new if e.get("pruned", True)})
        entries += new
        layers[i].to("cpu")
    del cap
    for e in entries:       # a weight left dense where first met may be tied to one pruned later
        if not e.get("pruned", True) and "shared_with" not in e:
            lin = linears_of[e["layer"]].get(e["sublayer"])
            if lin is not None and id(lin.weight) in pruned_before:
                e["shared_with"] = pruned_before[id(lin.weight)]
    pruned = [e for e in entries if e.get("pruned", True)]
    if not pruned:
        reasons = sorted({e["reason"] for e in entries})
        raise DriverError(f"{type(model).__name__}: no sublayer of {layers_name} could be pruned "
                          f"({'; '.join(reasons) or 'no linear sublayers'}); the model is unchanged")
    total = sum(e["shape"][0] * e["shape"][1] for e in pruned)
    zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in pruned)
    # sublayer names (expert indices as "*": a MoE layer has up to hundreds of experts), with
    # the layers named where it is not every layer's
    dense_in: Dict[str, set] = {}
    for e in entries:
        if not e.get("pruned", True) and "shared_with" not in e:
            name = ".".join("*" if part.isdigit() else part for part in e["sublayer"].split("."))
            dense_in.setdefault(name, set()).add(e["layer"])
    left_dense = sorted(name if len(where) == len(layers) else
                        f"{name} (layer{'s' if len(where) > 1 else ''} {_ranges(sorted(where))})"
                        for name, where in dense_in.items())
    refined = sorted({e["sublayer"] for e in pruned if e["refined"]})
    skipped = sorted({e["sublayer"] for e in pruned if not e["refined"]})
    return {
        "layers": layers_name, "num_layers": len(layers),
        "sparsity": zeros / total if total else 0.0,
        # the pruned linears' share of the decoder layers' weight matrices (1.0 unless some
        # stay dense: see left_dense and the sublayer entries' "reason")
        "pruned_share_of_decoder_weights": total / matrix_total if matrix_total else 0.0,
        "left_dense": left_dense,
        "calibration_tokens": list(samples.shape),
        "refined_sublayers": refined, "unrefined_sublayers": skipped,
        "mean_swaps_refined": (sum(e["mean_swaps"] * e["shape"][0] for e in pruned if e["refined"]) /
                               max(1, sum(e["shape"][0] for e in pruned if e["refined"]))),
        "backends": sorted({e["backend"] for e in pruned}),
        "sublayers": entries,
    }


def _eval(model, args: PruneArgs, windows: torch.Tensor, device, desc: str) -> Dict[str, float]:
    _, layers = find_decoder_layers(model)
    return perplexity(model, layers, windows, args.batch_size, device, progress=_progress(args, desc))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, via a temporary file renamed into place (mode as ``open``'s)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())         # mkstemp makes 0600
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(part, target)
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise


def save_model(model: nn.Module, tokenizer, report: Dict[str, Any], path: str) -> None:
    """safetensors model + tokenizer + report.json, atomically: a temp dir renamed into place.
    The weights are saved in the dtype the run used (``report["dtype"]``)."""
    check_save_dir(path)
    target = _resolved(path, "--save")
    umask = _umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask)              # mkdtemp makes 0700
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        with open(tmp / "dsnot_report.json", "w") as fh:
            json.dump(report, fh, indent=2)
        for item in tmp.rglob("*"):               # safetensors writes its files 0600
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
        if target.exists():
            target.rmdir()            # empty (checked); rename cannot replace a directory
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(args: PruneArgs, model: Optional[nn.Module] = None, tokenizer=None) -> Dict[str, Any]:
    """The whole job: returns the report (also written to ``args.report`` / saved with ``args.save``).

    ``model``/``tokenizer`` may be passed in (already loaded, on the CPU); ``args.model`` then
    only names them in the report.
    """
    with _transformers_progress_bars(args.progress and not args.quiet):
        return _run(args, model, tokenizer)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """transformers' own bars (loading, saving) off for the run unless ``enabled``, then on
    again if they were (left alone when ``enabled``: the user's settings stand)."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:          # pragma: no cover - load_model names the missing package
        yield
        return
    turn_off = not enabled and tf_logging.is_progress_bar_enabled()
    if turn_off:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            tf_logging.enable_progress_bar()


def load(args: PruneArgs) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` as :func:`run` loads them for ``args`` (on the CPU, in the dtype
    ``args`` gives for its device), e.g. to check several runs' settings with
    :func:`check_model` before the first, then pass to it (``run(args, model, tokenizer)``)."""
    with _transformers_progress_bars(args.progress and not args.quiet):
        dtype = resolve_dtype(args.dtype, resolve_device(args.device))
        model, tokenizer, _ = load_model(args.model, dtype, _log(args))
    return model, tokenizer


def check_model(model: nn.Module, args: PruneArgs) -> None:
    """The checks of ``args`` that need the model, made before any pruning: every sublayer's
    weight is float32/float16/bfloat16 and not on the meta device, the pattern's M
    divides every sublayer's in_features, every ``--skip`` name matches a sublayer, ``--seqlen``
    fits the model's positions. Raises DriverError."""
    layers_name, layers = find_decoder_layers(model)
    check_weights(layers, layers_name)
    check_pattern(layers, layers_name, args.refine_config())
    check_skip(layers, layers_name, parse_skip(args.skip_policy()))
    max_len = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_len, int) and 0 < max_len < args.seqlen:      # XLNet says -1: no limit
        raise DriverError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings={max_len}")


def _run(args: PruneArgs, model: Optional[nn.Module], tokenizer) -> Dict[str, Any]:
    log = _log(args)
    total = timed()
    timings = {name: 0.0 for name in STAGES}
    # -- every check that can fail fast, before any expensive work --------------------------
    cfg = args.refine_config()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _check_backend(args.backend, device, args.pattern)
    check_save_dir(args.save)
    check_report_path(args.report, args.save)
    report_path = str(Path(args.report).absolute()) if args.report else None   # where it was checked
    if args.eval_dense and not args.eval:
        raise DriverError("--eval-dense measures the dense model before the evaluation, which --no-eval "
                          "turns off: drop one of them")
    plan = data_mod.plan_text(args.dataset, args.calib_text, args.eval_text)
    data_mod.check_text_files(plan, evaluate=args.eval)
    if args.batch_size <= 0:
        raise DriverError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nsamples < 1 or args.seqlen < 2:
        raise DriverError(f"--nsamples must be >= 1 and --seqlen >= 2, got {args.nsamples} and {args.seqlen}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise DriverError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    skip = parse_skip(args.skip_policy())
    if args.refine and cfg.max_cycle_time == 0 and args.init == "sparsegpt" and args.max_cycle_time is None:
        log("--init sparsegpt: keeping SparseGPT's masks (DSnoT after SparseGPT measured worse); "
            "name --preset original or --max-cycle-time to run DSnoT on them")

    clock = timed()
    if model is None:
        model, tokenizer, source = load_model(args.model, dtype, log)
    else:
        source = "given"
        if tokenizer is None:
            raise DriverError("run(args, model=...) needs the model's tokenizer too (tokenizer=...)")
        model.eval()
    use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = False
    timings["load"] = clock()
    try:
        check_model(model, args)
        # both texts become tokens now, so that one too short fails before any pruning
        clock = timed()
        samples = data_mod.calibration_tokens(plan, tokenizer, args.nsamples, args.seqlen, args.seed, log)
        timings["calibration"] += clock()
        windows = None
        if args.eval:
            clock = timed()
            windows = data_mod.evaluation_windows(plan, tokenizer, args.seqlen, args.eval_windows, log)
            timings["evaluation"] += clock()
        if report_path:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)

        report: Dict[str, Any] = {
            "model": args.model, "model_source": source, "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(device),
            "config": {**{k: v for k, v in dataclasses.asdict(cfg).items()},
                       "sign_check_resolved": cfg.resolved_sign_check(), "preset": args.preset_name(),
                       "skip": skip, "refine": args.refine and cfg.max_cycle_time > 0},
            "data": {**plan.describe(), "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                     "eval_windows": args.eval_windows, "batch_size": args.batch_size},
        }
        if args.eval and args.eval_dense:
            clock = timed()
            dense = _eval(model, args, windows, device, "evaluation (dense)")
            timings["evaluation_dense"] = clock()
            report["ppl_dense"] = dense["ppl"]
            report["eval"] = {k: dense[k] for k in ("windows", "seqlen")}
            log(f"dense perplexity {dense['ppl']:.3f} ({dense['windows']} windows of {dense['seqlen']} tokens)")
        report.update(prune_model(model, samples, args, cfg, device, timings))
        if args.eval:
            clock = timed()
            after = _eval(model, args, windows, device, "evaluation")
            timings["evaluation"] += clock()
            report["ppl"] = after["ppl"]
            report["eval"] = {k: after[k] for k in ("windows", "seqlen")}
    finally:
        model.config.use_cache = use_cache      # the caller's model keeps its setting (and --save)
    timings["pruning"] = sum(timings[k] for k in ("calibration", "statistics", "initial_masks", "refine",
                                                  "propagation"))
    timings["total"] = total()
    report["timings"] = timings
    report["torch"] = torch.__version__
    report["dsnot_kernels"] = dk.__version__
    if args.save:
        report["saved_to"] = str(Path(args.save).absolute())
        clock = timed()
        try:
            save_model(model, tokenizer, report, args.save)
        except OSError as exc:
            raise DriverError(f"--save {args.save!r}: writing the model failed, nothing was saved ({exc})") from exc
        timings["save"] = clock()
    if report_path:
        try:
            _write_json_atomic(report_path, report)
        except OSError as exc:
            raise DriverError(f"--report {args.report!r}: writing it failed ({exc})") from exc
    return report


def summary(report: Dict[str, Any]) -> str:
    """A few human-readable lines about a report."""
    cfg = report["config"]
    t = report["timings"]
    what = f"{cfg['init']}{' + DSnoT' if cfg['refine'] else ''}"
    lines = [f"{report['model']} ({report['model_class']}, {report['dtype']}, {report['device']}): "
             f"{what}, {cfg['pattern']}"
             + (f" {cfg['sparsity']:.0%}" if cfg["pattern"] == "unstructured" else "")
             + f" -> sparsity {report['sparsity']:.4f} over the pruned decoder linears"]
    if report.get("left_dense"):
        share = report["pruned_share_of_decoder_weights"]
        lines.append(f"left dense: {', '.join(report['left_dense'])} (the pruned linears hold {share:.1%} "
                     f"of the decoder layers' weights; reasons in the report's sublayer entries)")
    if cfg["refine"]:
        lines.append(f"refined: {', '.join(report['refined_sublayers']) or 'none'}; "
                     f"kept initial mask: {', '.join(report['unrefined_sublayers']) or 'none'}; "
                     f"mean swaps/row {report['mean_swaps_refined']:.2f}; backend {', '.join(report['backends'])}")
    if "ppl" in report:
        dense = f"dense {report['ppl_dense']:.3f} -> " if "ppl_dense" in report else ""
        lines.append(f"perplexity: {dense}{report['ppl']:.3f} "
                     f"({report['eval']['windows']} windows x {report['eval']['seqlen']} tokens, {report['data']['evaluation']})")
    lines.append("time (s): " + ", ".join(f"{k} {t[k]:.2f}" for k in (*STAGES, "evaluation_dense", "total")
                                          if k in t))
    return "\n".join(lines)

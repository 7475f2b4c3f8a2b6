"""Running a causal LM one decoder layer at a time.

The decoder layers stay on the CPU and visit the compute device one at a time, so a model
larger than the device's memory still prunes and evaluates. Two tricks keep this generic:

- **capture**: every decoder layer is temporarily replaced by a parameter-free recorder and the
  *rest* of the model (embeddings, rotary tables, final norm, head) is moved to the device and
  run on the token batches. Each recorder stores the positional and keyword arguments its
  layer would have received (transformers 5 passes ``position_embeddings``, masks, ``position_ids``,
  ...; Gemma 2/3 pass different masks and rotary tables to sliding and global layers, so the
  arguments are recorded *per layer*) and returns its input unchanged, in the form a real layer
  returns its output (a tensor, or a tuple ``(hidden, None, ...)`` that the model may unpack:
  learned by running the real first layer once); the first recorder also keeps the hidden
  states (the first layer's input). The last recorder stops the forward. A layer the model
  never calls (Mllama's cross-attention layers, on text) is passed over (except the first
  layer, which must be called); a layer output the
  model hands to the next layer (state) cannot be replayed from recorded arguments: refused.
  So is a model that changes the hidden states between two layers (XLM's residual, norms and
  feed-forward sit outside the ``ModuleList`` the driver finds): on the first batch every
  recorder checks that it receives exactly what the previous one returned.
- **head**: to turn the last layer's output into logits, the layers are replaced by injectors
  that pass their input through, except the last, which returns the stored final hidden states;
  the model's own final norm, head and logit soft-capping then run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .models import DriverError


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


Call = Tuple[tuple, Dict[str, Any]]      # (extra positional args, keyword args) of one layer call


@dataclass
class Captured:
    """The first layer's inputs and every layer's call arguments, one entry per batch."""

    hidden: List[torch.Tensor]                         # per batch [b, seq, hidden], on the device
    calls: List[List[Call]]                            # [layer][batch]; [] for a layer the model skips
    tokens: List[Tuple[int, int]] = field(default_factory=list)   # per batch (b, seq) of the token ids
    # the length of the tuple a real layer returns (None: a tensor); stand-ins return the same
    # form, (hidden, None, ...), as models may unpack it (``hidden, attn = layer(...)``)
    tuple_len: Optional[int] = None

    def skipped(self, index: int) -> bool:
        """Whether the model never calls layer ``index`` (e.g. the cross-attention layers of a
        vision-language model on text alone): the layer then passes its input through."""
        return not self.calls[index]


def as_layer_output(hidden: torch.Tensor, cap: Captured):
    """``hidden`` in the form a real decoder layer returns its output."""
    return hidden if cap.tuple_len is None else (hidden,) + (None,) * (cap.tuple_len - 1)


class _Plan:
    """What the recorders do on the current pass: the layer whose recorder stops the forward
    (-1: the first one after layer 0), the extra outputs layer 0's stand-in returns, and
    whether to check the chain of hidden states (``handed``: the last recorder's index and a
    copy of what it returned; ``broken``: the first pair of layers between which it changed)."""

    def __init__(self) -> None:
        self.stop_at = 0
        self.extras: Optional[tuple] = None
        self.check_chain = False
        self.handed: Optional[Tuple[int, torch.Tensor]] = None
        self.broken: Optional[Tuple[int, int]] = None


def _split_hidden(args: tuple, kwargs: dict):
    """The hidden states (first positional argument, or ``hidden_states=``) and the other args."""
    if args:
        return args[0], args[1:]
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), ()
    raise TypeError("a decoder layer was called without hidden states")


class _Stub(nn.Module):
    """A stand-in for a decoder layer. Attributes it lacks are read from the layer it replaces
    (some models read e.g. ``layer.attention_type`` in their forward), which is kept outside
    the module tree so that moving the model to the device leaves that layer where it is."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            replaced = self.__dict__.get("_replaced")
            if replaced is None:
                raise
            return getattr(replaced, name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN equal to NaN (a model whose activations overflow is
    not one that changes them between its layers)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


class _Recorder(_Stub):
    def __init__(self, index: int, plan: _Plan, sink: "Captured"):
        super().__init__()
        self.index, self.plan, self.sink = index, plan, sink

    def forward(self, *args, **kwargs):
        hidden, args = _split_hidden(args, kwargs)
        if kwargs.get("past_key_values") is not None:     # never carry a KV cache between layers
            kwargs["past_key_values"] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.sink.calls[self.index].append((args, kwargs))
        if self.index == 0:
            self.sink.hidden.append(hidden)
        if self.plan.check_chain:
            # replaying layer by layer is exact only if the model hands each layer the
            # previous layer's output unchanged (a copy: the model may change it in place)
            handed = self.plan.handed
            if handed is not None and self.plan.broken is None and not _same(hidden, handed[1]):
                self.plan.broken = (handed[0], self.index)
            self.plan.handed = (self.index, hidden.clone())
        if self.index == self.plan.stop_at or (self.plan.stop_at == -1 and self.index > 0):
            raise _Stop
        if self.plan.extras is not None and self.index == 0:
            return (hidden,) + self.plan.extras
        return as_layer_output(hidden, self.sink)


class _Injector(_Stub):
    def __init__(self, index: int, last: int, final: Callable[[], torch.Tensor], cap: Captured):
        super().__init__()
        self.index, self.last, self.final, self.cap = index, last, final, cap

    def forward(self, *args, **kwargs):
        hidden, _ = _split_hidden(args, kwargs)
        out = self.final() if self.index == self.last else hidden
        return as_layer_output(out, self.cap)


class _Swapped:
    """Context: replace the layers of ``layers`` by ``stubs`` and put the rest of the model on ``device``."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, stubs: Sequence[nn.Module], device):
        self.model, self.layers, self.stubs, self.device = model, layers, stubs, device
        self.originals: List[nn.Module] = []

    def __enter__(self):
        self.originals = list(self.layers)
        for i, stub in enumerate(self.stubs):
            stub.__dict__["_replaced"] = self.originals[i]    # not a submodule: see _Stub
            self.layers[i] = stub
        self.model.to(self.device)        # moves everything but the (swapped-out) decoder layers
        return self

    def __exit__(self, *exc):
        self.model.to("cpu")
        for i, layer in enumerate(self.originals):
            self.layers[i] = layer
        return False


@torch.no_grad()
def capture(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor],
            device: torch.device) -> Captured:
    """Record the first layer's input and each layer's call arguments for every token batch."""
    n = len(layers)
    cap = Captured(hidden=[], calls=[[] for _ in range(n)])
    plan = _Plan()
    stubs = [_Recorder(i, plan, cap) for i in range(n)]
    first_layer = layers[0] if n else None
    with _Swapped(model, layers, stubs, device):
        if batches and first_layer is not None:
            _learn_output_form(model, first_layer, plan, cap, batches[0], device)
        plan.stop_at = n - 1
        for b, ids in enumerate(batches):
            plan.check_chain, plan.handed = b == 0, None
            _forward(model, ids, device)
            cap.tokens.append((int(ids.shape[0]), int(ids.shape[1])))
    if plan.broken is not None:
        before, after = plan.broken
        raise DriverError(f"{type(model).__name__}: the model changes the hidden states between its decoder layers "
                          f"{before} and {after} (e.g. a norm or residual outside the layers of the ModuleList "
                          f"found), so running the layers one at a time would not compute the model")
    counts = [len(calls) for calls in cap.calls]
    if counts and (counts[0] != len(batches) or any(c not in (0, len(batches)) for c in counts)):
        raise DriverError(f"{type(model).__name__}: its decoder layers were not called once per batch "
                          f"(calls per layer {counts}, {len(batches)} batches): cannot run them one at a time")
    return cap


def _forward(model: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    """The model on ``ids`` with its layers swapped for recorders, until a recorder stops it."""
    try:
        model(input_ids=ids.to(device), use_cache=False)     # a model may skip its last layer on text
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001
        raise DriverError(f"{type(model).__name__}: running it with its decoder layers one at a time "
                          f"failed ({type(exc).__name__}: {exc})") from exc


def _learn_output_form(model: nn.Module, layer0: nn.Module, plan: _Plan, cap: Captured, ids: torch.Tensor,
                       device: torch.device) -> None:
    """Set ``cap.tuple_len`` from the real layer 0 run on its recorded input of ``ids``. If it
    returns a tuple, its stand-in returns marker tensors in the other entries once more: a
    model that hands the next layer one that stands for a value (not None) passes state from
    layer to layer, which recorded arguments cannot replay (DriverError). Leaves ``cap`` empty."""
    _forward(model, ids, device)                 # stops at layer 0's recorder (plan.stop_at == 0)
    if not cap.hidden:
        raise DriverError(f"{type(model).__name__}: the forward pass did not reach its first decoder layer")
    hidden, (args, kwargs) = cap.hidden.pop(), cap.calls[0].pop()
    try:
        out = layer0.to(device)(hidden, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise DriverError(f"{type(layer0).__name__}: running the first decoder layer alone failed "
                          f"({type(exc).__name__}: {exc})") from exc
    finally:
        layer0.to("cpu")
    if not isinstance(out, (tuple, list)):
        return
    cap.tuple_len = len(out)
    if len(out) < 2:
        return
    # markers where the real layer returns a value (a None handed on is replayed exactly: the
    # stand-ins return None there too)
    plan.stop_at, plan.extras = -1, tuple(None if value is None else torch.empty(0) for value in out[1:])
    _forward(model, ids, device)                 # stops at the next layer's recorder, if any
    markers = [marker for marker in plan.extras if marker is not None]
    handed_on = [value for calls in cap.calls[1:] for args, kwargs in calls
                 for value in (*args, *kwargs.values()) if any(value is marker for marker in markers)]
    for calls in cap.calls:
        calls.clear()
    cap.hidden.clear()
    plan.extras = None
    if handed_on:
        raise DriverError(f"{type(layer0).__name__} returns {len(out)} values and the model passes one of "
                          f"them to the next layer: state passed from layer to layer, which the driver "
                          f"cannot replay (it runs the layers one at a time from recorded arguments)")


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """One decoder layer on one batch, returning the hidden states (whatever the output type)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def sync(device: torch.device) -> None:
    """Wait for queued device work (so stage timings are honest)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def propagate(layers: nn.ModuleList, cap: Captured, device: torch.device,
              progress: Optional[Callable[[Any], Any]] = None) -> None:
    """Run every batch through every layer in order (layers visit ``device`` one at a time)."""
    for i in (progress(range(len(layers))) if progress else range(len(layers))):
        if cap.skipped(i):
            continue
        layer = layers[i].to(device)
        for b in range(len(cap.hidden)):
            cap.hidden[b] = run_layer(layer, cap.hidden[b], cap.calls[i][b])
        layers[i].to("cpu")


@torch.no_grad()
def head_logits_nll(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor],
                    cap: Captured, device: torch.device) -> List[float]:
    """Mean next-token NLL of each window, from the final hidden states in ``cap``."""
    n = len(layers)
    state = {"b": 0}
    last = max(i for i in range(n) if not cap.skipped(i))     # the last layer the model calls
    stubs = [_Injector(i, last, lambda: cap.hidden[state["b"]], cap) for i in range(n)]
    nlls: List[float] = []
    with _Swapped(model, layers, stubs, device):
        for b, ids in enumerate(batches):
            state["b"] = b
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            shift = logits[:, :-1, :].float()
            target = ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                                     reduction="none").view(target.shape)
            nlls.extend(loss.mean(dim=1).double().cpu().tolist())
    return nlls


@torch.no_grad()
def perplexity(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
               device: torch.device, progress: Optional[Callable[[Any], Any]] = None) -> Dict[str, float]:
    """WikiText-2 protocol: ``exp(mean over windows of the window's mean token NLL)``;
    ``progress`` wraps the iteration over the layers (e.g. a tqdm bar)."""
    batches = list(torch.split(windows, batch_size))
    cap = capture(model, layers, batches, device)
    propagate(layers, cap, device, progress)
    nlls = head_logits_nll(model, layers, batches, cap, device)
    mean = sum(nlls) / len(nlls)
    return {"ppl": float(torch.tensor(mean, dtype=torch.float64).exp()), "mean_nll": mean,
            "windows": len(nlls), "seqlen": int(windows.shape[1])}

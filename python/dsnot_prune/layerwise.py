"""Running a causal LM one decoder layer at a time.

The decoder layers stay on the CPU and visit the compute device one at a time, so a model
larger than the device's memory still prunes and evaluates. Two tricks keep this generic:

- **capture**: every decoder layer is temporarily replaced by a parameter-free recorder and the
  *rest* of the model (embeddings, rotary tables, final norm, head) is moved to the device and
  run on the token batches. Each recorder stores the positional and keyword arguments its
  layer would have received (transformers 5 passes ``position_embeddings``, masks, ``position_ids``,
  ...; Gemma 2/3 pass different masks and rotary tables to sliding and global layers, so the
  arguments are recorded *per layer*) and returns its input unchanged; the first recorder also
  keeps the hidden states (the first layer's input). The last recorder stops the forward.
- **head**: to turn the last layer's output into logits, the layers are replaced by injectors
  that pass their input through, except the last, which returns the stored final hidden states;
  the model's own final norm, head and logit soft-capping then run unchanged.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


Call = Tuple[tuple, Dict[str, Any]]      # (extra positional args, keyword args) of one layer call


@dataclass
class Captured:
    """The first layer's inputs and every layer's call arguments, one entry per batch."""

    hidden: List[torch.Tensor]                         # per batch [b, seq, hidden], on the device
    calls: List[List[Call]]                            # [layer][batch]
    tuple_output: Optional[bool] = None                # does a real layer return a tuple?


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


class _Recorder(_Stub):
    def __init__(self, index: int, last: int, sink: "Captured"):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden, args = _split_hidden(args, kwargs)
        if kwargs.get("past_key_values") is not None:     # never carry a KV cache between layers
            kwargs["past_key_values"] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.sink.calls[self.index].append((args, kwargs))
        if self.index == 0:
            self.sink.hidden.append(hidden)
        if self.index == self.last:
            raise _Stop
        return hidden


class _Injector(_Stub):
    def __init__(self, index: int, last: int, final: Callable[[], torch.Tensor], as_tuple: bool):
        super().__init__()
        self.index, self.last, self.final, self.as_tuple = index, last, final, as_tuple

    def forward(self, *args, **kwargs):
        hidden, _ = _split_hidden(args, kwargs)
        out = self.final() if self.index == self.last else hidden
        return (out,) if self.as_tuple else out


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
    stubs = [_Recorder(i, n - 1, cap) for i in range(n)]
    with _Swapped(model, layers, stubs, device):
        for b, ids in enumerate(batches):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                continue
            except Exception as exc:  # noqa: BLE001
                # The model choked on a recorder's pass-through output (a model whose layers
                # return tuples): fall back to the first layer's arguments for every layer.
                if len(cap.hidden) != b + 1:
                    raise
                warnings.warn(f"could not record per-layer arguments ({type(exc).__name__}: {exc}); "
                              f"using the first layer's arguments for every layer")
                for i in range(1, n):
                    del cap.calls[i][b:]
                    cap.calls[i].append(cap.calls[0][b])
    return cap


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: Call, cap: Captured) -> torch.Tensor:
    """One decoder layer on one batch, returning the hidden states (whatever the output type)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    is_tuple = isinstance(out, (tuple, list))
    if cap.tuple_output is None:
        cap.tuple_output = is_tuple
    return out[0] if is_tuple else out


def sync(device: torch.device) -> None:
    """Wait for queued device work (so stage timings are honest)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def propagate(layers: nn.ModuleList, cap: Captured, device: torch.device,
              progress: Optional[Callable[[Any], Any]] = None) -> None:
    """Run every batch through every layer in order (layers visit ``device`` one at a time)."""
    for i in (progress(range(len(layers))) if progress else range(len(layers))):
        layer = layers[i].to(device)
        for b in range(len(cap.hidden)):
            cap.hidden[b] = run_layer(layer, cap.hidden[b], cap.calls[i][b], cap)
        layers[i].to("cpu")


@torch.no_grad()
def head_logits_nll(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor],
                    cap: Captured, device: torch.device) -> List[float]:
    """Mean next-token NLL of each window, from the final hidden states in ``cap``."""
    n = len(layers)
    state = {"b": 0}
    stubs = [_Injector(i, n - 1, lambda: cap.hidden[state["b"]], bool(cap.tuple_output)) for i in range(n)]
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

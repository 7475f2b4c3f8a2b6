"""The layer-wise driver (python/dsnot_prune) on tiny random models: no download, CPU, seconds.

Each tiny model is a randomly initialised Llama / Qwen2 / Gemma3 / OPT made here from a config
(2-3 layers, width 64), with a byte-level BPE tokenizer trained here on a generated text.
"""
from __future__ import annotations

import json
import math
import os
import random

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dsnot_kernels as dk  # noqa: E402
from dsnot_prune import cli  # noqa: E402
from dsnot_prune.layerwise import _Injector, _Swapped, _same, capture, head_logits_nll, propagate  # noqa: E402
from dsnot_prune.models import (DriverError, find_decoder_layers, find_linears, is_skipped, sublayer_kind,  # noqa: E402
                                weight_matrix)
from dsnot_prune.pipeline import PruneArgs, run  # noqa: E402
from helpers import VOCAB, train_tokenizer, whole_model_ppl, write_corpus  # noqa: E402


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)
    if kind == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2)
    if kind == "gemma3":   # sliding + global layers: different masks and rotary tables per layer
        return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **common, intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if kind == "opt":
        return transformers.OPTForCausalLM, transformers.OPTConfig(
            **common, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, max_position_embeddings=256)
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    if kind == "mistral":
        return transformers.MistralForCausalLM, transformers.MistralConfig(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, sliding_window=8)
    if kind == "gemma2":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
            sliding_window=8)
    if kind == "phi3":   # fused qkv_proj and gate_up_proj
        return transformers.Phi3ForCausalLM, transformers.Phi3Config(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0)
    if kind == "mixtral":   # MoE: transformers 5 stacks the experts in [experts, out, in] parameters
        return transformers.MixtralForCausalLM, transformers.MixtralConfig(
            **common, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2)
    if kind == "gemma3n":   # AltUp: layers pass [4, batch, seq, hidden]; a router linear called twice
        return transformers.Gemma3nForCausalLM, transformers.Gemma3nTextConfig(
            **common, vocab_size_per_layer_input=VOCAB, intermediate_size=128, num_hidden_layers=4,
            num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=16, laurel_rank=8,
            num_kv_shared_layers=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
            activation_sparsity_pattern=[0.0] * 4, max_position_embeddings=512)
    if kind == "bamba":     # mamba + attention; in transformers 5 the model unpacks (hidden, attn_weights)
        return transformers.BambaForCausalLM, transformers.BambaConfig(
            **common, intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, attn_layer_indices=[1],
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
            mamba_chunk_size=16, pad_token_id=0)
    if kind == "mllama":    # Llama 3.2 Vision's text model: cross-attention layer 1 is skipped on text
        from transformers.models.mllama.configuration_mllama import MllamaTextConfig   # not top-level in 4.x
        return transformers.MllamaForCausalLM, MllamaTextConfig(
            **common, intermediate_size=128, num_hidden_layers=4, num_key_value_heads=2, cross_attention_layers=[1],
            max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_scaling={"rope_type": "default"})                      # 4.x requires it
    if kind == "deepseek_v3":   # MLA: kv_b_proj reads a [batch, 1, seq, rank] latent in transformers 5
        return transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
            **common, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=2,
            kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8,
            n_group=1, topk_group=1, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "bart":      # an encoder-decoder's causal LM: num_hidden_layers is the encoder's count (3)
        return transformers.BartForCausalLM, transformers.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    if kind == "gpt_neox":
        return transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
            **common, intermediate_size=128, num_hidden_layers=2)
    if kind == "gpt2":      # Conv1D sublayers (weights stored [in, out]); one fused c_attn for q/k/v
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    raise ValueError(kind)


def make_model(kind: str, dtype=torch.float32, seed: int = 0):
    cls, config = _config(kind)
    torch.manual_seed(seed)
    # from_config(dtype=...) keeps float32 rotary buffers, like from_pretrained(dtype=...) does
    return cls._from_config(config, dtype=dtype).eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module")
def tokenizer(text_file):
    fast = train_tokenizer(text_file)
    assert len(fast) <= VOCAB
    return fast


def _args(text_file, **kw) -> PruneArgs:
    base = dict(model="tiny", calib_text=text_file, eval_text=text_file, nsamples=6, seqlen=32, batch_size=4,
                eval_windows=4, device="cpu", backend="torch", progress=False, quiet=True)
    base.update(kw)
    return PruneArgs(**base)


def _decoder_linears(model):
    name, layers = find_decoder_layers(model)
    return {f"{name}.{i}.{n}": lin for i, layer in enumerate(layers) for n, lin in find_linears(layer).items()}


def _check_sparsity(model, pattern: str, sparsity: float):
    """Every decoder linear: exactly the requested pruned count per row / N per group of M."""
    n, m = dk.parse_pattern(pattern)
    linears = _decoder_linears(model)
    assert linears
    for name, lin in linears.items():
        zero = weight_matrix(lin).detach() == 0
        rows, cols = zero.shape
        if m:
            per_group = zero.reshape(rows, cols // m, m).sum(-1)
            assert bool((per_group >= n).all()), f"{name}: a group of {m} has fewer than {n} zeros"
            assert int(zero.sum()) == rows * cols // m * n, f"{name}: {int(zero.sum())} zeros"
        else:
            k = math.floor(cols * sparsity + 1e-9)
            assert bool((zero.sum(1) == k).all()), f"{name}: rows with != {k} zeros: {zero.sum(1).tolist()}"


def _logits(model, tokenizer, text_file):
    ids = tokenizer(open(text_file).read()[:2000], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# --------------------------------------------------------------------------------------------
# layer-wise execution equals the whole model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "opt", "qwen3", "mistral", "gemma2", "phi3", "gpt_neox",
                                  "gemma3n", "bamba", "mllama", "deepseek_v3", "gpt2"])
def test_layerwise_forward_equals_model_forward(kind):
    """Capture + layer-by-layer propagation + the model's own head give the model's logits."""
    model = make_model(kind)
    ids = torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(1))
    batches = list(torch.split(ids, 2))
    with torch.no_grad():
        want = []
        for batch in batches:
            logits = model(input_ids=batch, use_cache=False).logits.float()
            want += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:],
                                                      reduction="none").mean(1).tolist()
    _, layers = find_decoder_layers(model)
    cap = capture(model, layers, batches, torch.device("cpu"))
    propagate(layers, cap, torch.device("cpu"))
    got = head_logits_nll(model, layers, batches, cap, torch.device("cpu"))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


class _TypedLayer(torch.nn.Module):
    """A decoder layer whose model reads an attribute off it (as transformers 4.57's Qwen2
    reads ``layer.attention_type`` to pick the layer's mask)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.attention_type = "sliding" if index % 2 else "full"

    def forward(self, hidden, scale):
        return hidden + torch.tanh(self.proj(hidden)) * scale


class _ToyLM(torch.nn.Module):
    """An embedding, three decoder layers made by ``make_layer(i)`` and a head (vocab 16, width 8)."""

    def __init__(self, make_layer) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(make_layer(i) for i in range(3))
        self.head = torch.nn.Linear(8, 16)


def _toy_batches_and_nlls(model: _ToyLM):
    """Two batches of token ids and the model's own per-window mean NLLs on them."""
    ids = torch.randint(0, 16, (4, 10), generator=torch.Generator().manual_seed(2))
    batches = list(torch.split(ids, 2))
    with torch.no_grad():
        nlls = [torch.nn.functional.cross_entropy(model(b).logits[:, :-1].transpose(1, 2), b[:, 1:],
                                                  reduction="none").mean(1).tolist() for b in batches]
    return batches, sum(nlls, [])


class _TypedLM(_ToyLM):
    def __init__(self) -> None:
        super().__init__(_TypedLayer)

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, {"full": 1.0, "sliding": 0.5}[layer.attention_type])
        return SimpleNamespace(logits=self.head(hidden))


def test_layerwise_forward_reads_the_layers_attributes():
    """The stand-ins that replace the decoder layers while recording their calls and while
    running the head answer attribute reads from the layers they replace, and the replaced
    layers do not move with the rest of the model."""
    model = _TypedLM()
    batches, want = _toy_batches_and_nlls(model)
    cap = capture(model, model.layers, batches, torch.device("cpu"))
    assert [call[0] for call in cap.calls[1]] == [(0.5,), (0.5,)]      # the "sliding" layer's scale
    propagate(model.layers, cap, torch.device("cpu"))
    got = head_logits_nll(model, model.layers, batches, cap, torch.device("cpu"))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert all(isinstance(layer, _TypedLayer) for layer in model.layers)   # put back afterwards
    stubs = [_Injector(i, 2, lambda: None, cap) for i in range(3)]
    with _Swapped(model, model.layers, stubs, torch.device("cpu")):
        assert model.layers[1].attention_type == "sliding"
        # no layer weights in the module tree while swapped: moving the model leaves them
        assert {name for name, _ in model.named_parameters()} == {"embed.weight", "head.weight", "head.bias"}


def test_layer_and_sublayer_discovery():
    model = make_model("opt")
    name, layers = find_decoder_layers(model)
    assert name == "model.decoder.layers" and len(layers) == 2
    subs = set(find_linears(layers[0]))
    assert subs == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}
    assert {n: sublayer_kind(n) for n in ("fc1", "self_attn.out_proj", "mlp.gate_proj")} == \
        {"fc1": "mlp", "self_attn.out_proj": "attn", "mlp.gate_proj": "mlp"}
    assert is_skipped("mlp.up_proj", ["mlp"]) and not is_skipped("self_attn.q_proj", ["mlp"])
    assert is_skipped("self_attn.o_proj", ["mlp", "o_proj"])


def test_gpt2_conv1d_sublayers_are_found_as_out_in_views():
    """GPT-2's Conv1D stores its weight [in, out]: the driver finds it as a sublayer and refines
    the transposed view [out, in], whose writes land in the layer's own weight."""
    model = make_model("gpt2")
    name, layers = find_decoder_layers(model)
    assert name == "transformer.h" and len(layers) == 2
    subs = find_linears(layers[0])
    assert list(subs) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [sublayer_kind(n) for n in subs] == ["attn", "attn", "mlp", "mlp"]
    c_attn = subs["attn.c_attn"]
    assert tuple(c_attn.weight.shape) == (64, 192)              # [in, out] as stored
    view = weight_matrix(c_attn)
    assert tuple(view.shape) == (192, 64) and view.data_ptr() == c_attn.weight.data_ptr()
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_attn(x), x @ view.T + c_attn.bias)   # the [out, in] a linear layer uses
    mask = torch.zeros(192, 64, dtype=torch.bool)
    mask[5, 7] = True
    dk.apply_mask_(view, mask)
    assert c_attn.weight[7, 5] == 0 and int((c_attn.weight == 0).sum()) == 1


# --------------------------------------------------------------------------------------------
# the pipeline on each architecture
# --------------------------------------------------------------------------------------------
CASES = [
    pytest.param("llama", "unstructured", "wanda", torch.float32, id="llama-unstructured-wanda-fp32"),
    pytest.param("llama", "2:4", "wanda", torch.float32, id="llama-2:4-wanda-fp32"),
    pytest.param("llama", "unstructured", "magnitude", torch.bfloat16, id="llama-unstructured-magnitude-bf16"),
    pytest.param("llama", "2:4", "sparsegpt", torch.float32, id="llama-2:4-sparsegpt-fp32"),
    pytest.param("qwen2", "unstructured", "wanda", torch.float32, id="qwen2-unstructured-wanda-fp32"),
    pytest.param("qwen2", "2:4", "wanda", torch.float16, id="qwen2-2:4-wanda-fp16"),
    pytest.param("gemma3", "unstructured", "wanda", torch.float32, id="gemma3-unstructured-wanda-fp32"),
    pytest.param("gemma3", "2:4", "wanda", torch.float32, id="gemma3-2:4-wanda-fp32"),
    pytest.param("opt", "unstructured", "wanda", torch.float32, id="opt-unstructured-wanda-fp32"),
    pytest.param("opt", "2:4", "magnitude", torch.float32, id="opt-2:4-magnitude-fp32"),
    pytest.param("phi3", "unstructured", "wanda", torch.float32, id="phi3-unstructured-wanda-fp32"),
    pytest.param("gpt_neox", "2:4", "wanda", torch.float32, id="gpt_neox-2:4-wanda-fp32"),
    pytest.param("gpt2", "unstructured", "wanda", torch.float32, id="gpt2-unstructured-wanda-fp32"),
    pytest.param("gpt2", "2:4", "sparsegpt", torch.float32, id="gpt2-2:4-sparsegpt-fp32"),
]


@pytest.mark.parametrize("kind,pattern,init,dtype", CASES)
def test_pipeline_prunes_saves_and_reloads(kind, pattern, init, dtype, text_file, tokenizer, tmp_path):
    model = make_model(kind, dtype)
    sparsity = 0.6
    out = tmp_path / "pruned"
    args = _args(text_file, pattern=pattern, init=init, sparsity=sparsity, save=str(out),
                 report=str(tmp_path / "report.json"), dtype={torch.float32: "float32", torch.float16: "float16",
                                                              torch.bfloat16: "bfloat16"}[dtype])
    report = run(args, model=model, tokenizer=tokenizer)

    _check_sparsity(model, pattern, sparsity)
    expected = 0.5 if pattern == "2:4" else None
    if expected is not None:
        assert report["sparsity"] == pytest.approx(expected, abs=1e-9)
    for key in ("ppl", "sparsity", "sublayers", "timings", "refined_sublayers"):
        assert key in report, key
    assert math.isfinite(report["ppl"]) and report["ppl"] > 1
    for stage in ("load", "calibration", "statistics", "initial_masks", "refine", "propagation", "evaluation", "total"):
        assert report["timings"][stage] >= 0, stage
    # no --preset: robust for unstructured (every sublayer refined), original for N:M (MLP skipped)
    entries = report["sublayers"]
    assert len(entries) == len(_decoder_linears(model))
    assert args.preset is None and args.skip is None
    assert report["config"]["preset"] == ("original" if pattern == "2:4" else "robust")
    assert args.skip_policy() == ("mlp" if pattern == "2:4" else "none")
    if init == "sparsegpt":     # SparseGPT's masks are kept for every pattern (README, "DSnoT that helps")
        assert not any(e["refined"] for e in entries) and report["config"]["max_cycle_time"] == 0
    elif pattern == "2:4":
        assert {e["kind"] for e in entries if e["refined"]} == {"attn"}
        assert all(e["mean_swaps"] == 0 for e in entries if not e["refined"])
    else:
        assert args.skip_policy() == "none"
        assert {e["kind"] for e in entries if e["refined"]} == {"attn", "mlp"}
        assert all(e["refined"] for e in entries)
    for e in entries:
        for key in ("name", "shape", "sparsity", "refined", "mean_swaps", "mean_abs_error_before",
                    "mean_abs_error_after", "seconds"):
            assert key in e, key
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["ppl"] == report["ppl"]

    # the saved model reloads with plain transformers and computes the same logits
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    torch.testing.assert_close(_logits(reloaded, tokenizer, text_file), _logits(model, tokenizer, text_file),
                               rtol=0, atol=0)
    _check_sparsity(reloaded, pattern, sparsity)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # the model keeps its own use_cache (the run turns it off only while it works), and so does
    # the saved config; the saved directory and report have the modes plain writes get
    assert model.config.use_cache is True and reloaded.config.use_cache is True
    assert json.loads((out / "dsnot_report.json").read_text())["saved_to"] == str(out)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777, (tmp_path / "report.json").stat().st_mode & 0o777) == \
        (0o777 & ~umask, 0o666 & ~umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == \
        {p.name: 0o666 & ~umask for p in out.iterdir()}          # model.safetensors too


def test_dsnot_swaps_and_lowers_error(text_file, tokenizer):
    """Unstructured Wanda + DSnoT with every sublayer refined: swaps happen, |e| goes down."""
    report = run(_args(text_file, skip="none"), model=make_model("llama"), tokenizer=tokenizer)
    assert report["unrefined_sublayers"] == []
    assert report["left_dense"] == [] and report["pruned_share_of_decoder_weights"] == 1.0
    refined = [e for e in report["sublayers"] if e["refined"]]
    assert len(refined) == len(report["sublayers"])
    assert sum(e["mean_swaps"] for e in refined) > 0
    groups = {e["sublayer"]: e["group"] for e in report["sublayers"] if e["layer"] == 0}
    # one StatsAccumulator per distinct input: q/k/v share one, gate/up share one
    assert groups["self_attn.q_proj"] == groups["self_attn.k_proj"] == groups["self_attn.v_proj"]
    assert groups["mlp.gate_proj"] == groups["mlp.up_proj"]
    assert len({groups["self_attn.q_proj"], groups["self_attn.o_proj"], groups["mlp.gate_proj"],
                groups["mlp.down_proj"]}) == 4
    before = sum(e["mean_abs_error_before"] for e in refined)
    after = sum(e["mean_abs_error_after"] for e in refined)
    assert after < before


def _decoder_matrices(model) -> dict:
    _, layers = find_decoder_layers(model)
    return {f"{i}.{name}": p.detach().clone() for i, layer in enumerate(layers)
            for name, p in layer.named_parameters() if p.dim() >= 2}


def test_weights_left_dense_are_reported(text_file, tokenizer, capsys):
    """A MoE model (experts stacked in one parameter in transformers 5, routed nn.Linear experts
    in 4.x) and a linear its layer never calls: every weight matrix of the decoder layers is in
    exactly one report entry, those left dense keep their values and say why, and the report
    and its summary give the pruned linears' share instead of implying the whole model."""
    from dsnot_prune.pipeline import summary
    model = make_model("mixtral")
    model.model.layers[0].add_module("unused", torch.nn.Linear(64, 32))     # never called
    before = _decoder_matrices(model)
    report = run(_args(text_file, skip="none", quiet=False), model=model, tokenizer=tokenizer)
    if transformers.__version__.split(".")[0] != "4":   # 5.x: stacked experts, warned before pruning
        log = capsys.readouterr().err
        assert "warning: " in log and "mlp.experts.gate_up_proj" in log and "stay dense" in log, log

    entries = report["sublayers"]
    dense = [e for e in entries if not e.get("pruned", True)]
    assert sum(math.prod(e["shape"]) for e in entries) == sum(t.numel() for t in before.values())
    assert all(e["reason"] and e["refined"] is False for e in dense)
    assert "unused (layer 0)" in report["left_dense"]       # one layer only: named
    assert any("expert" in name for name in report["left_dense"])
    # the router, an nn.Linear in transformers 4.x and a bare parameter in 5, stays dense in both
    assert {"block_sparse_moe.gate", "mlp.gate.weight"} & set(report["left_dense"])
    unused = [e for e in dense if e["sublayer"] == "unused"]
    assert len(unused) == 1 and "no input reached it" in unused[0]["reason"]
    after = _decoder_matrices(model)
    layer_of = {e["name"]: e for e in dense}
    for key, value in before.items():
        i, name = key.split(".", 1)
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        entry = layer_of.get(f"model.layers.{i}.{module}") or layer_of.get(f"model.layers.{i}.{name}")
        if entry is not None:
            assert torch.equal(after[key], value), key           # left dense: untouched
    pruned = sum(math.prod(e["shape"]) for e in entries if e.get("pruned", True))
    share = report["pruned_share_of_decoder_weights"]
    assert share == pytest.approx(pruned / sum(t.numel() for t in before.values())) and 0 < share < 1
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)    # over the pruned linears only
    assert f"{share:.1%} of the decoder layers' weights" in summary(report)
    assert "left dense: " in summary(report)


@pytest.mark.parametrize("kind,left_dense", [
    ("gemma3n", ["altup.modality_router"]),          # called twice per layer, with different inputs
    ("bamba", ["mamba.conv1d.weight (layers 0, 2)"]),
    ("mllama", [f"{name} (layer 1)" for name in ("cross_attn.k_proj", "cross_attn.o_proj", "cross_attn.q_proj",
                                                 "cross_attn.v_proj", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")]),
    ("deepseek_v3", []),                               # kv_b_proj's [batch, 1, seq, rank] input is one row per token
    ("bart", [f"encoder_attn.{name}" for name in ("k_proj", "out_proj", "q_proj", "v_proj")]),   # no encoder: not called
])
def test_pipeline_on_unusual_layers(kind, left_dense, text_file, tokenizer):
    """Layers that pass [4, batch, seq, hidden] (Gemma 3n), return a tuple the model unpacks
    (Bamba), are skipped on text (Mllama), feed a linear a 4-D input (DeepSeek's MLA), or are
    fewer than the config's num_hidden_layers (BART's causal LM: the decoder alone): every
    weight matrix in one report entry, what stays dense named, and the perplexity the run
    reports equals the whole model's on the same windows."""
    model = make_model(kind)
    before = _decoder_matrices(model)
    report = run(_args(text_file, skip="none"), model=model, tokenizer=tokenizer)
    assert report["left_dense"] == left_dense
    assert sum(math.prod(e["shape"]) for e in report["sublayers"]) == sum(t.numel() for t in before.values())
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-9)
    if kind == "mllama":    # the layer the model skips on text is left whole
        assert all(torch.equal(v, _decoder_matrices(model)[k]) for k, v in before.items() if k.startswith("1."))
    from dsnot_prune import data as data_mod
    plan = data_mod.plan_text("news", text_file, text_file)
    windows = data_mod.evaluation_windows(plan, tokenizer, 32, 4, lambda *a: None)
    assert report["ppl"] == pytest.approx(whole_model_ppl(model, windows, len(windows)), rel=1e-4)


def test_tied_weights_are_pruned_once(text_file, tokenizer):
    """A weight shared by two layers (Zamba2's shared block) is pruned where first met and kept
    with that mask later: one pruned entry, the other ``shared_with`` it, not "left dense"."""
    model = make_model("llama")
    layers = model.model.layers
    layers[1].self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight
    layers[0].self_attn.v_proj.weight = layers[0].self_attn.k_proj.weight       # within one layer too
    report = run(_args(text_file, skip="none", eval=False), model=model, tokenizer=tokenizer)
    tied = [e for e in report["sublayers"] if e["sublayer"] == "self_attn.o_proj"]
    assert [e.get("pruned", True) for e in tied] == [True, False]
    assert tied[1]["shared_with"] == "model.layers.0.self_attn.o_proj"
    v0 = [e for e in report["sublayers"] if e["name"] == "model.layers.0.self_attn.v_proj"]
    assert v0[0]["pruned"] is False and v0[0]["shared_with"] == "model.layers.0.self_attn.k_proj"
    assert report["left_dense"] == [] and report["pruned_share_of_decoder_weights"] == pytest.approx(1.0)
    _check_sparsity(model, "unstructured", 0.5)


class _RoutedMoE(torch.nn.Module):
    """GraniteMoE-like (4.x): no parameter named 'expert', a MoE class, a router under 'router'."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Module()
        self.router.layer = torch.nn.Linear(8, 4)
        self.input_linear = torch.nn.Parameter(torch.zeros(4, 16, 8))


def test_moe_routers_are_found_by_name_in_moe_layers():
    from dsnot_prune.models import moe_routers
    from dsnot_prune.pipeline import _ranges
    layer = torch.nn.Module()
    layer.block_sparse_moe = _RoutedMoE()
    layer.self_attn = torch.nn.Linear(8, 8)
    assert moe_routers(layer) == ["block_sparse_moe.router.layer"]
    hunyuan = torch.nn.Module()                         # HunYuan-MoE: mlp.gate.wg beside the experts
    hunyuan.mlp = torch.nn.Module()
    hunyuan.mlp.gate = torch.nn.Module()
    hunyuan.mlp.gate.wg = torch.nn.Linear(8, 4)
    hunyuan.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    hunyuan.mlp.gate_proj = torch.nn.Linear(8, 8)       # a name part "gate_proj" is no router
    assert moe_routers(hunyuan) == ["mlp.gate.wg"]
    dense = make_model("llama").model.layers[0]         # no experts: its mlp.gate_proj stays a sublayer
    assert moe_routers(dense) == []
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranges([3]) == "3"


class _PairLayer(torch.nn.Module):
    """Returns ``(hidden, extra)``: ``extra`` None, or (``carry``) a state the next layer reads."""

    def __init__(self, carry: bool) -> None:
        super().__init__()
        self.proj, self.carry = torch.nn.Linear(8, 8), carry

    def forward(self, hidden, state=None):
        out = hidden + torch.tanh(self.proj(hidden)) * (1.0 if state is None else state)
        return out, (out.mean() if self.carry else None)


class _PairLM(_ToyLM):
    """A model that unpacks its layers' outputs, ``hidden, extra = layer(hidden, extra)``."""

    def __init__(self, carry: bool) -> None:
        super().__init__(lambda i: _PairLayer(carry))

    def forward(self, input_ids, use_cache=False):
        hidden, extra = self.embed(input_ids), None
        for layer in self.layers:
            hidden, extra = layer(hidden, extra)
        return SimpleNamespace(logits=self.head(hidden))


def test_layers_whose_outputs_the_model_unpacks():
    """Stand-ins return a real layer's tuple form when the model unpacks it (the layer-wise
    logits equal the model's); a layer output the model passes on as state is refused."""
    model = _PairLM(carry=False)
    batches, want = _toy_batches_and_nlls(model)
    cap = capture(model, model.layers, batches, torch.device("cpu"))
    assert cap.tuple_len == 2
    propagate(model.layers, cap, torch.device("cpu"))
    got = head_logits_nll(model, model.layers, batches, cap, torch.device("cpu"))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    carrying = _PairLM(carry=True)
    with pytest.raises(DriverError, match="passes one of them to the next layer"):
        capture(carrying, carrying.layers, batches, torch.device("cpu"))


class _BetweenLM(_ToyLM):
    """A model that changes the hidden states between its layers (as XLM, whose residuals and
    norms sit outside the ModuleList of attention blocks), out of place or in place."""

    def __init__(self, in_place: bool) -> None:
        super().__init__(lambda i: _PairLayer(carry=False))
        self.norm, self.in_place = torch.nn.LayerNorm(8), in_place

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden)[0]
            if i == 1:
                if self.in_place:
                    hidden.mul_(0.5)
                else:
                    hidden = self.norm(hidden)
        return SimpleNamespace(logits=self.head(hidden))


@pytest.mark.parametrize("in_place", [False, True])
def test_model_that_changes_hidden_states_between_layers_is_refused(in_place):
    """Running the layers one at a time would skip what the model does between them: refused,
    naming the two layers, and the model's layers are put back."""
    model = _BetweenLM(in_place)
    batches, _ = _toy_batches_and_nlls(model)
    with pytest.raises(DriverError, match="changes the hidden states between its decoder layers 1 and 2"):
        capture(model, model.layers, batches, torch.device("cpu"))
    assert all(isinstance(layer, _PairLayer) for layer in model.layers)
    nan = torch.tensor([1.0, float("nan")])          # overflowed activations are not a change
    assert _same(nan, nan.clone()) and not _same(nan, torch.tensor([1.0, 0.0])) and not _same(nan, nan.half())


def test_unlimited_positions_are_not_a_limit(text_file):
    """XLNet's config says max_position_embeddings=-1 (no limit): no --seqlen is refused for it,
    while a real limit still is."""
    from dsnot_prune.pipeline import check_model
    model = make_model("llama")
    model.config.max_position_embeddings = -1
    check_model(model, _args(text_file, seqlen=100000))
    model.config.max_position_embeddings = 64
    with pytest.raises(DriverError, match="--seqlen 100 exceeds the model's max_position_embeddings=64"):
        check_model(model, _args(text_file, seqlen=100))


def test_a_model_with_nothing_to_prune_is_an_error(text_file, tokenizer):
    """Every linear left dense (here: each called twice per layer with different inputs):
    a DriverError with the reason, not a run that reports sparsity 0."""
    model = make_model("llama")
    for layer in model.model.layers:
        for name, lin in find_linears(layer).items():
            parent = layer.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], _Twice(lin))
    with pytest.raises(DriverError, match="no sublayer of model.layers could be pruned .*called with different inputs"):
        run(_args(text_file), model=model, tokenizer=tokenizer)


class _Twice(torch.nn.Module):
    """``inner`` called twice per forward, on different inputs."""

    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0 * self.inner(x * 2)


class _SecondCallOnly(torch.nn.Module):
    """``inner``, plus an ``extra`` linear whose output is added (times 0) on the second call only."""

    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.inner, self.extra, self.calls = inner, torch.nn.Linear(inner.in_features, inner.out_features), 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out + 0 * self.extra(x) if self.calls == 2 else out


def test_linear_missing_from_the_first_batch_stays_dense(text_file, tokenizer):
    """A linear first called in the second calibration batch: left dense with its reason (its
    statistics would lack the first batch), not a crash."""
    model = make_model("llama")
    layer = model.model.layers[1]
    layer.mlp.down_proj = _SecondCallOnly(layer.mlp.down_proj)
    extra = layer.mlp.down_proj.extra.weight.detach().clone()
    report = run(_args(text_file, nsamples=8, batch_size=4, eval=False), model=model, tokenizer=tokenizer)
    entry = [e for e in report["sublayers"] if e["name"] == "model.layers.1.mlp.down_proj.extra"]
    assert len(entry) == 1 and entry[0]["pruned"] is False
    assert entry[0]["reason"] == "called in some calibration batches but not the first"
    assert torch.equal(layer.mlp.down_proj.extra.weight, extra)
    assert report["left_dense"] == ["mlp.down_proj.extra (layer 1)"]
    inner = [e for e in report["sublayers"] if e["name"] == "model.layers.1.mlp.down_proj.inner"]
    assert inner[0]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("case", ["int8", "meta"])
def test_quantized_or_offloaded_weights_fail_before_pruning(case, text_file, tokenizer):
    """A sublayer weight that is no float16/bfloat16/float32 values (a quantized model) or on the
    meta device (offloaded): a DriverError naming it before any layer is pruned."""
    model = make_model("llama")
    up = model.model.layers[1].mlp.up_proj
    shape = tuple(up.weight.shape)
    up.weight = torch.nn.Parameter(torch.zeros(shape, dtype=torch.int8) if case == "int8"
                                   else torch.empty(shape, device="meta"), requires_grad=False)
    before = _decoder_matrices(model)
    match = "int8; dsnot-prune prunes float32, float16 and bfloat16 weights (a quantized model?" \
        if case == "int8" else "on the meta device"
    with pytest.raises(DriverError) as err:
        run(_args(text_file), model=model, tokenizer=tokenizer)
    assert str(err.value).startswith("model.layers.1.mlp.up_proj: its weight is ") and match in str(err.value), err.value
    after = _decoder_matrices(model)
    assert all(torch.equal(after[k], v) for k, v in before.items() if v.device.type != "meta")


def test_no_refine_is_the_initial_mask(text_file, tokenizer):
    report = run(_args(text_file, refine=False), model=make_model("qwen2"), tokenizer=tokenizer)
    assert report["refined_sublayers"] == [] and report["config"]["refine"] is False
    assert report["timings"]["refine"] == 0.0
    assert all(e["mean_swaps"] == 0 and e["mean_abs_error_before"] == e["mean_abs_error_after"]
               for e in report["sublayers"])


def _calibration_samples(args: PruneArgs, tokenizer) -> torch.Tensor:
    """The token ids ``[nsamples, seqlen]`` a driver run with ``args`` calibrates on."""
    from dsnot_prune import data
    plan = data.plan_text("news", args.calib_text, args.eval_text)
    return data.calibration_tokens(plan, tokenizer, args.nsamples, args.seqlen, args.seed, log=lambda m: None)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_output_error_equals_the_sublayers_own_outputs(kind, text_file, tokenizer):
    """``--output-error``'s final figures equal the output error computed directly: layer 0's
    first sublayer (q_proj; GPT-2's Conv1D c_attn), run with its dense and its pruned weight on
    the calibration tokens' inputs (the normed embeddings, which no pruning changes)."""
    args = _args(text_file, sparsity=0.5, eval=False, output_error=True)
    pruned, dense = make_model(kind), make_model(kind)
    report = run(args, model=pruned, tokenizer=tokenizer)

    samples = _calibration_samples(args, tokenizer)
    layers_name, layers = find_decoder_layers(dense)
    sub_name, sub = next(iter(find_linears(layers[0]).items()))
    inputs = []
    handle = sub.register_forward_pre_hook(lambda module, inp: inputs.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for batch in torch.split(samples, args.batch_size):
            dense(input_ids=batch, use_cache=False)
    handle.remove()
    x = torch.cat(inputs).double()                                   # [tokens, in]
    pruned_sub = find_linears(find_decoder_layers(pruned)[1][0])[sub_name]
    delta = (weight_matrix(sub) - weight_matrix(pruned_sub)).detach().double()      # [out, in]
    assert int((weight_matrix(pruned_sub) == 0).sum()) > 0
    error = x @ delta.T                                              # [tokens, out]
    entry = next(e for e in report["sublayers"] if e["name"] == f"{layers_name}.0.{sub_name}")
    assert entry["out_mse_final"] == pytest.approx(float((error ** 2).mean()), rel=1e-4)
    assert entry["out_mean_sq_final"] == pytest.approx(float((error.mean(0) ** 2).mean()), rel=1e-4)
    assert math.isfinite(entry["out_mse_initial"]) and entry["out_mse_initial"] > 0


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_driver_equals_naive_whole_model_pruning(kind, text_file, tokenizer):
    """SPEC §6 done the slow obvious way (whole-model forwards, hooks on layer i, layers < i pruned)
    gives exactly the driver's masks."""
    args = _args(text_file, skip="mlp", sparsity=0.5, eval=False)
    driven = make_model(kind)
    run(args, model=driven, tokenizer=tokenizer)

    naive = make_model(kind)
    samples = _calibration_samples(args, tokenizer)
    cfg = args.refine_config()
    _, layers = find_decoder_layers(naive)
    for layer in layers:
        linears = find_linears(layer)
        accs = {}

        def hook(name):
            def fn(module, inp):
                accs.setdefault(name, dk.StatsAccumulator(inp[0].shape[-1])).update(inp[0])
            return fn
        handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
        with torch.no_grad():
            for batch in torch.split(samples, args.batch_size):
                naive(input_ids=batch, use_cache=False)
        for h in handles:
            h.remove()
        for name, lin in linears.items():
            layer_cfg = cfg if not is_skipped(name, ["mlp"]) else dk.RefineConfig(**{**cfg.__dict__, "max_cycle_time": 0})
            weight = lin.weight if isinstance(lin, torch.nn.Linear) else lin.weight.t()   # Conv1D: [in, out]
            dk.apply_mask_(weight, dk.refine(weight, accs[name].finalize(), layer_cfg, backend="torch"))
    want, got = _decoder_linears(naive), _decoder_linears(driven)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name].weight == 0, got[name].weight == 0), f"{name}: masks differ"


def test_cli_on_a_local_model_directory(text_file, tokenizer, tmp_path, capsys):
    src = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    rc = cli.main(["--model", str(src), "--calib-text", text_file, "--eval-text", text_file,
                   "--nsamples", "4", "--seqlen", "32",
                   "--eval-windows", "2", "--eval-dense", "--device", "cpu", "--backend", "torch", "--sparsity", "0.5",
                   "--report", str(tmp_path / "r.json"), "--no-progress", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "sparsity 0.5000" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model_source"] == "local" and "ppl_dense" in report and report["sparsity"] == pytest.approx(0.5)
    assert report["data"]["calibration"] == report["data"]["evaluation"] == f"file:{text_file}"


# --------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written
# --------------------------------------------------------------------------------------------
def _fails(argv, capsys, match):
    rc = cli.main(argv + ["--no-progress", "--quiet", "--device", "cpu", "--backend", "torch"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "dsnot-prune: error:" in err and match in err, err
    return err


def test_unknown_model(capsys, tmp_path, text_file):
    out = tmp_path / "out"
    _fails(["--model", str(tmp_path / "no-such-dir"), "--calib-text", text_file, "--eval-text", text_file,
            "--save", str(out), "--report", str(tmp_path / "r.json")], capsys, "no such directory")
    _fails(["--model", "no-such-org/no-such-model-xyz", "--calib-text", text_file, "--eval-text", text_file,
            "--save", str(out)], capsys, "no-such-org/no-such-model-xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pattern_that_does_not_divide_a_width(capsys, tmp_path, text_file, tokenizer):
    src = tmp_path / "tiny"
    make_model("llama").save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    out, rep = tmp_path / "out", tmp_path / "r.json"
    err = _fails(["--model", str(src), "--pattern", "2:3", "--calib-text", text_file, "--eval-text", text_file,
                  "--save", str(out), "--report", str(rep)], capsys, "M=3 does not divide in_features=64")
    assert "self_attn.q_proj" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.parametrize("case", ["missing", "directory", "binary", "empty"])
def test_unreadable_text_file(case, capsys, tmp_path):
    path = tmp_path / "text.txt"
    if case == "directory":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 100)
    elif case == "empty":
        path.write_text("  \n")
    match = {"missing": "no such file", "directory": "is a directory", "binary": "not UTF-8",
             "empty": "is empty"}[case]
    _fails(["--model", "smollm2", "--calib-text", str(path), "--save", str(tmp_path / "out")], capsys, match)
    assert not (tmp_path / "out").exists()


def test_save_into_non_empty_directory(capsys, tmp_path, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails(["--model", "smollm2", "--calib-text", text_file, "--eval-text", text_file, "--save", str(out)],
           capsys, "not an empty directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--max-cycle-time", "-1"], "--max-cycle-time must be an int >= 0"),
    (["--eval-dense", "--no-eval"], "--eval-dense measures the dense model before the evaluation"),
    (["--pattern", "4:2"], "need 1 <= N < M"),
    (["--skip", ""], "--skip must not be empty"),
    (["--dataset", "wikitext2", "--no-eval", "--nsamples", "1"], "datasets"),
    (["--eval-windows", "0"], "--eval-windows must be >= 1"),
    (["--nsamples", "0"], "--nsamples must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seqlen", "1"], "--seqlen >= 2"),
    (["--skip", "mlp,none"], "'none' cannot be combined"),
], ids=["sparsity", "max-cycle-time", "eval-dense-without-eval", "pattern", "skip",
        "dataset-without-datasets", "eval-windows", "nsamples", "batch-size", "seqlen", "skip-none-and-more"])
def test_bad_options(argv, match, capsys, tmp_path, text_file, tokenizer, monkeypatch):
    if "wikitext2" in argv:
        try:
            import datasets  # noqa: F401
            pytest.skip("the datasets package is installed here")
        except ImportError:
            pass
        src = tmp_path / "tiny"
        make_model("llama").save_pretrained(str(src))
        tokenizer.save_pretrained(str(src))
        argv = argv + ["--model", str(src)]
    _fails(argv, capsys, match)


@pytest.mark.parametrize("argv,match", [
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--device", "cpu", "--backend", "fast"], "--backend must be 'auto' or one of"),
    (["--device", "cpu", "--backend", "triton"], "--backend triton cannot run on cpu"),
], ids=["cuda-without-cuda", "unknown-backend", "triton-on-cpu"])
def test_device_and_backend_are_checked_first(argv, match, capsys, tmp_path, text_file, monkeypatch):
    """A first run on a machine without what it names fails before the model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # Triton on a CPU is a test mode only
    rc = cli.main(["--model", "smollm2", "--calib-text", text_file, "--eval-text", text_file,
                   "--save", str(tmp_path / "out"), "--no-progress", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and f"dsnot-prune: error: {match}" in err, err
    assert not (tmp_path / "out").exists()


def test_models_the_driver_cannot_prune(capsys, tmp_path, text_file, tokenizer):
    """A directory that is no model, and a model whose decoder layers hold no linear sublayer
    (here torch's own Conv1d, a real convolution, unlike transformers' Conv1D): clean errors,
    nothing saved."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    _fails(["--model", str(empty), "--calib-text", text_file, "--eval-text", text_file, "--save", str(out)],
           capsys, "is a directory without config.json")
    model = make_model("gpt2")
    for block in model.transformer.h:
        block.mlp.c_fc = torch.nn.Conv1d(64, 64, 1)
        block.mlp.c_proj = torch.nn.Conv1d(64, 64, 1)
        block.attn.c_attn = torch.nn.Conv1d(64, 192, 1)
        block.attn.c_proj = torch.nn.Conv1d(64, 64, 1)
    with pytest.raises(DriverError, match=r"GPT2LMHeadModel: found no nn.ModuleList of 2 decoder layers with "
                                          r"nn.Linear \(or GPT-2 style Conv1D\) sublayers"):
        run(_args(text_file, save=str(out)), model=model, tokenizer=tokenizer)
    assert not out.exists()


def test_save_under_a_missing_directory(capsys, tmp_path, text_file):
    _fails(["--model", "smollm2", "--calib-text", text_file, "--eval-text", text_file,
            "--save", str(tmp_path / "no-such-dir" / "out")], capsys, "parent directory")
    assert list(tmp_path.iterdir()) == []


def test_calibration_text_too_short(capsys, tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    _fails(["--model", str(_tiny_dir(tmp_path, tokenizer)), "--calib-text", str(short), "--no-eval",
            "--seqlen", "32", "--nsamples", "1"], capsys, "too short for --seqlen 32")


def _tiny_dir(tmp_path, tokenizer):
    src = tmp_path / "tiny"
    make_model("llama").save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    return src


@pytest.mark.parametrize("case", ["report-inside-save", "report-inside-save-via-dots",
                                  "report-is-a-directory", "save-unwritable",
                                  "report-unwritable", "report-under-a-file"])
def test_output_paths_are_checked_before_any_work(case, capsys, tmp_path, text_file):
    """Where --save/--report cannot be written is found before the model loads, not after the
    run (the model named here would take a minute to prune)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    save, report, match = {
        "report-inside-save": (tmp_path / "out", tmp_path / "out" / "sub" / "r.json", "lies inside --save"),
        "report-inside-save-via-dots": (tmp_path / "out", tmp_path / "a-dir" / ".." / "out" / "r.json",
                                        "lies inside --save"),
        "report-is-a-directory": (None, tmp_path / "a-dir", "is a directory"),
        "save-unwritable": (Path("/proc/dsnot-out"), None, "cannot write to '/proc'"),
        "report-unwritable": (None, Path("/proc/sub/r.json"), "cannot write to '/proc'"),
        "report-under-a-file": (None, tmp_path / "a-file" / "r.json", "is a file, not a directory"),
    }[case]
    argv = ["--model", "smollm2", "--calib-text", text_file, "--eval-text", text_file]
    argv += ["--save", str(save)] if save else []
    argv += ["--report", str(report)] if report else []
    _fails(argv, capsys, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]
    assert list((tmp_path / "a-dir").iterdir()) == []


def test_save_through_links_and_not_into_the_working_directory(capsys, tmp_path, text_file, tokenizer,
                                                                monkeypatch):
    """--save naming a link saves where it points (an empty directory, or a new one for a
    dangling link) instead of failing after the run; --save naming the working directory is
    refused before any work (saving replaces the directory: the shell would sit in a deleted
    one), and a relative --report is written even so."""
    src = _tiny_dir(tmp_path, tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "to-empty").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "not-yet")
    base = ["--model", str(src), "--calib-text", text_file, "--eval-text", text_file, "--nsamples", "2",
            "--seqlen", "16", "--no-eval", "--device", "cpu", "--backend", "torch", "--quiet"]
    for link, target in (("to-empty", "empty"), ("dangling", "not-yet")):
        assert cli.main(base + ["--save", str(tmp_path / link)]) == 0, capsys.readouterr().err
        assert (tmp_path / target / "config.json").is_file() and (tmp_path / link).is_symlink()
        assert (tmp_path / link / "dsnot_report.json").is_file()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    _fails(base + ["--save", str(tmp_path / "loop")], capsys, "cannot follow its symbolic links")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _fails(base + ["--save", ".", "--report", "r.json"], capsys, "--save '.' is the current directory")
    assert list(work.iterdir()) == []
    assert cli.main(base + ["--save", "model", "--report", "r.json"]) == 0
    assert (work / "r.json").is_file() and (work / "model" / "config.json").is_file()


def test_sparsegpt_keeps_its_mask_unless_asked():
    """DSnoT after SparseGPT made perplexity worse (README): with ``--init sparsegpt`` the
    driver keeps SparseGPT's masks for every pattern unless --preset or --max-cycle-time says
    otherwise; other inits refine."""
    cycles = lambda **kw: PruneArgs(**kw).refine_config().max_cycle_time   # noqa: E731
    assert cycles(init="sparsegpt") == 0 and cycles(init="sparsegpt", pattern="2:4") == 0
    assert cycles(init="sparsegpt", pattern="2:4", preset="original") == 50
    assert cycles(init="sparsegpt", pattern="4:8", max_cycle_time=10) == 10
    assert cycles(init="wanda", pattern="2:4") == 50 and cycles(init="wanda") == 50
    assert cycles(init="wanda", refine=False) == 0


def test_skip_name_that_matches_no_sublayer(capsys, tmp_path, text_file, tokenizer):
    src = _tiny_dir(tmp_path, tokenizer)
    err = _fails(["--model", str(src), "--skip", "mlp,o_porj", "--calib-text", text_file, "--eval-text",
                  text_file, "--save", str(tmp_path / "out")], capsys, "--skip 'o_porj' matches no sublayer")
    assert "self_attn.o_proj" in err and not (tmp_path / "out").exists()


def test_device_must_be_cpu_or_cuda(capsys, text_file):
    # (not _fails: it appends --device cpu)
    rc = cli.main(["--model", "smollm2", "--calib-text", text_file, "--device", "mps", "--quiet"])
    assert rc == 2 and "--device must be cpu, cuda or cuda:N, got 'mps'" in capsys.readouterr().err


def test_evaluation_text_too_short_fails_before_pruning(capsys, tmp_path, text_file, tokenizer):
    src = _tiny_dir(tmp_path, tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("The model said.")
    _fails(["--model", str(src), "--calib-text", text_file, "--eval-text", str(short), "--seqlen", "32",
            "--save", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")], capsys, "not one window")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt", "tiny"]


def test_one_text_file_however_spelled_is_split_in_halves(text_file, monkeypatch):
    from dsnot_prune import data
    monkeypatch.chdir(Path(text_file).parent)
    for spelling in ("corpus.txt", "./corpus.txt", f"../{Path(text_file).parent.name}/corpus.txt"):
        plan = data.plan_text("news", text_file, spelling)
        assert plan.calib == plan.eval == f"file:{text_file}", spelling


def test_progress_bars_and_quiet(text_file, tokenizer, tmp_path, capsys):
    """Progress bars for pruning and evaluation; --quiet silences them and transformers' own
    (saving), and leaves transformers' setting as it was."""
    from transformers.utils import logging as tf_logging
    run(_args(text_file, progress=True, quiet=False, eval_windows=2), model=make_model("llama"),
        tokenizer=tokenizer)
    err = capsys.readouterr().err
    assert "pruning" in err and "evaluation" in err
    assert tf_logging.is_progress_bar_enabled()
    run(_args(text_file, quiet=True, eval_windows=2, save=str(tmp_path / "out")), model=make_model("llama"),
        tokenizer=tokenizer)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert tf_logging.is_progress_bar_enabled()


# --------------------------------------------------------------------------------------------
# calibration sampling and evaluation windows
# --------------------------------------------------------------------------------------------
def test_stream_sampling_matches_the_original_formula():
    from dsnot_prune.data import _stream_samples
    ids = torch.arange(1000)
    got = _stream_samples(ids, nsamples=5, seqlen=16, seed=3, what="t")
    random.seed(3)   # the original: random.seed(seed); i = random.randint(0, n - seqlen - 1)
    starts = [random.randint(0, 1000 - 16 - 1) for _ in range(5)]
    assert torch.equal(got, torch.stack([ids[i:i + 16] for i in starts]))
    assert not torch.equal(got, _stream_samples(ids, 5, 16, seed=4, what="t"))


def test_evaluation_windows_and_disjoint_halves(text_file, tokenizer):
    from dsnot_prune import data
    plan = data.plan_text("news", text_file, text_file)
    calib = data._source_texts(plan.calib, plan, "calib", log=None)
    evals = data._source_texts(plan.eval, plan, "eval", log=None)
    lines = open(text_file).read().splitlines()
    assert calib.splitlines() == lines[:200] and evals.splitlines() == lines[200:]
    windows = data.evaluation_windows(plan, tokenizer, 32, None, log=None)
    ids = tokenizer(evals, return_tensors="pt").input_ids[0]
    assert windows.shape == (ids.numel() // 32, 32)               # remainder dropped
    assert torch.equal(windows.reshape(-1), ids[: windows.numel()])
    assert data.evaluation_windows(plan, tokenizer, 32, 3, log=None).shape == (3, 32)
    with pytest.raises(DriverError, match="not one window"):
        data.evaluation_windows(plan, tokenizer, 10 ** 6, None, log=None)


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the driver on the device, fast backends equal the torch backend
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pipeline_on_cuda_backends_agree(pattern, text_file, tokenizer):
    masks = {}
    for backend in ["torch"] + [b for b, ok in dk.available_backends("cuda", pattern).items()
                                if ok is True and b not in ("torch", "reference")]:
        model = make_model("llama", torch.float16)
        report = run(_args(text_file, pattern=pattern, device="cuda", backend=backend, dtype="float16",
                           skip="none", eval=False), model=model, tokenizer=tokenizer)
        assert report["backends"] == [backend]
        _check_sparsity(model, pattern, 0.5)
        masks[backend] = {n: lin.weight == 0 for n, lin in _decoder_linears(model).items()}
    for backend, got in masks.items():
        for name in got:
            assert torch.equal(got[name], masks["torch"][name]), f"{backend} vs torch: {name}"


def test_default_skip_follows_the_preset(text_file, tokenizer):
    """--skip unset: the original preset keeps the MLP's initial mask (as the paper's code), robust refines all."""
    assert PruneArgs(preset="original").skip_policy() == "mlp"
    assert PruneArgs(preset="robust").skip_policy() == "none"
    assert PruneArgs(preset="original", skip="attn").skip_policy() == "attn"
    assert PruneArgs().preset_name() == "robust" and PruneArgs(pattern="2:4").preset_name() == "original"
    assert PruneArgs(pattern="2:4", preset="robust").preset_name() == "robust"
    report = run(_args(text_file, preset="original", eval=False), model=make_model("llama"), tokenizer=tokenizer)
    assert {e["kind"] for e in report["sublayers"] if e["refined"]} == {"attn"}
    assert all(e["mean_swaps"] == 0 for e in report["sublayers"] if not e["refined"])


def test_cli_help_states_only_true_defaults():
    """Switches show no stored default (``--no-refine`` stores refine=True, which would read as
    "on by default"), and no flag shows "(default: None)"."""
    text = " ".join(cli.build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "--no-refine keep the initial masks (the baseline without DSnoT) --preset" in text
    assert "(default: 0.5)" in text and "(default: 128)" in text         # real defaults stay

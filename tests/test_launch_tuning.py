"""``refine_triton(select="auto")`` on a GPU times the select kernel's launches and keeps the
fastest per problem class (``dsnot_kernels.ops.launch_tuning``).

Without a GPU the tuning is switched on by hand and its clock replaced by made-up times, so
these tests check the mechanism (which launches compete, that the fastest wins, that a class
is tuned once, that a launch with a different result or a failing launch is dropped) with
every candidate really run under the interpreter; the ``gpu`` test tunes with real times.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import dsnot_kernels as dk
from dsnot_kernels.api import build_problem

from helpers import assert_same_output, make_layer, reference_output

pytest.importorskip("triton")
from dsnot_kernels.ops import launch_tuning, refine_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpret


def _problem(out, inn, pattern="unstructured", initial_mask=None, seed=0):
    w, stats = make_layer(out, inn, torch.float16, seed=seed)
    cfg = dk.RefineConfig(sparsity=0.6, pattern=pattern, max_cycle_time=8, update_threshold=0.01)
    return build_problem(w.to(DEVICE), stats.to(DEVICE), cfg, initial_mask)[0]


@pytest.fixture
def fake_clock(monkeypatch):
    """Tuning on (even on a CPU), a fresh tuning table, and a clock that returns the times
    set in ``times`` (launch name -> seconds; unnamed launches take 1 s); every launch it
    'times' still runs once, and ``runs`` counts the runs of each launch."""
    state = {"times": {}, "runs": {}, "current": None}
    monkeypatch.setattr(launch_tuning, "enabled", lambda device: True)
    launch_tuning.reset()

    def tuned_refine(problem, cap, run):
        def counted(**knobs):
            name = launch_tuning.launch_name(knobs)
            state["runs"][name] = state["runs"].get(name, 0) + 1
            state["current"] = name
            return run(**knobs)
        return original(problem, cap, counted)

    def time_launch(run):
        out = run()
        return state["times"].get(state["current"], 1.0), [out]

    original = launch_tuning.tuned_refine
    monkeypatch.setattr(launch_tuning, "tuned_refine", tuned_refine)
    monkeypatch.setattr(launch_tuning, "time_launch", time_launch)
    yield state
    launch_tuning.reset()


def test_candidates_per_problem():
    names = lambda p: [launch_tuning.launch_name(k) for k in launch_tuning.candidates(p)]  # noqa: E731
    unstructured = names(_problem(2, 4096))
    assert unstructured[0] == "select=rows"                       # the default launch first
    assert len(unstructured) == len(set(unstructured)) == len(launch_tuning.CANDIDATES)
    nm = names(_problem(2, 4096, "2:4"))
    assert nm[0] == "select=stream" and not any("row_programs_per_sm" in n for n in nm)
    given = names(_problem(2, 64, initial_mask=torch.rand(2, 64).to(DEVICE) < 0.5))
    assert not any("row_programs_per_sm" in n for n in given)    # the seed needs no given mask
    wide = names(_problem(1, launch_tuning.ROWS_MAX_COLS + 1))
    assert wide[0] == "select=stream" and all("select=stream" in n for n in wide)
    # every candidate is a valid refine_triton launch: the knobs it names exist
    for knobs in launch_tuning.CANDIDATES:
        assert set(knobs) <= {"select", "programs_per_sm", "num_warps", "chunk", "queue_search",
                              "row_programs_per_sm"}


def test_pow2_is_triton_next_power_of_2():
    # the launchers' host-side pow2 replaces triton.next_power_of_2 (slow on the host)
    import triton
    for n in [*range(-2, 70), 4095, 4096, 4097, 11008, 2 ** 31 - 1, 2 ** 31 + 1, 4096.0]:
        assert launch_tuning.pow2(n) == triton.next_power_of_2(max(1, int(n))), n


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_fastest_launch_wins_and_is_kept(fake_clock, pattern):
    problem = _problem(9, 64, pattern)
    expected = reference_output(*make_layer(9, 64, torch.float16), dk.RefineConfig(
        sparsity=0.6, pattern=pattern, max_cycle_time=8, update_threshold=0.01))[1]
    fake_clock["times"] = {"select=stream,programs_per_sm=4": 0.5}
    out = refine_triton(problem, cap=16)
    assert_same_output(expected, out, "tuned call")
    all_runs = dict(fake_clock["runs"])
    assert len(all_runs) == len(launch_tuning.candidates(problem))     # every candidate ran
    (entry,) = launch_tuning.tuned_launches()
    assert entry["launch"] == "select=stream,programs_per_sm=4"
    assert entry["rows"] == 9 and entry["cols"] == 64 and entry["pattern"] == pattern
    assert set(entry["seconds"]) == set(all_runs) and not entry["dropped"]

    # a second call of the same class (other rows of the same padded count) runs the winner once
    fake_clock["runs"].clear()
    again = refine_triton(_problem(12, 60, pattern, seed=1), cap=16)
    assert fake_clock["runs"] == {"select=stream,programs_per_sm=4": 1}
    problem2, expected2 = reference_output(*make_layer(12, 60, torch.float16, seed=1), dk.RefineConfig(
        sparsity=0.6, pattern=pattern, max_cycle_time=8, update_threshold=0.01))
    assert_same_output(expected2, again, "winner on the second call")
    assert len(launch_tuning.tuned_launches()) == 1


def test_knobs_or_switch_turn_tuning_off(fake_clock, monkeypatch):
    problem = _problem(5, 64)
    refine_triton(problem, cap=16, queue_search="serial")      # a knob given: no tuning
    refine_triton(problem, cap=16, select="stream")
    assert fake_clock["runs"] == {} and launch_tuning.tuned_launches() == []
    monkeypatch.undo()                                           # the real enabled()
    monkeypatch.setenv("DSNOT_TRITON_TUNE", "0")
    assert not launch_tuning.enabled(torch.device("cuda"))
    monkeypatch.setenv("DSNOT_TRITON_TUNE", "1")
    assert launch_tuning.enabled(torch.device("cuda")) == (os.environ.get("TRITON_INTERPRET") != "1")
    assert not launch_tuning.enabled(torch.device("cpu"))


def test_deep_queues_take_the_default_launch_untuned(fake_clock, monkeypatch):
    """Queues deeper than TUNE_MAX_DEPTH are not tuned (their candidates' sorts are slow to
    compile): the call runs the default launch alone and records no tuning."""
    monkeypatch.setattr(launch_tuning, "TUNE_MAX_DEPTH", 16)
    w, stats = make_layer(5, 64, torch.float16, seed=0)
    for cycles, tuned in ((16, True), (17, False)):
        launch_tuning.reset()
        fake_clock["runs"].clear()
        cfg = dk.RefineConfig(sparsity=0.6, max_cycle_time=cycles, update_threshold=0.01)
        problem = build_problem(w.to(DEVICE), stats.to(DEVICE), cfg)[0]
        assert launch_tuning.applies(problem) == tuned
        _, expected = reference_output(w, stats, cfg)
        assert_same_output(expected, refine_triton(problem, cap=16), f"T={cycles}")
        assert (len(launch_tuning.tuned_launches()) == 1) == tuned
        assert (sum(fake_clock["runs"].values()) > 1) == tuned


def test_differing_or_failing_launch_is_dropped(fake_clock, monkeypatch):
    problem = _problem(6, 64)
    real = refine_triton
    calls = {"rows": 0}

    def faulty(problem, cap, **knobs):
        if knobs.get("num_warps") == 1:
            raise RuntimeError("out of resources: shared memory\nmore text")
        out = real(problem, cap, **knobs)
        if knobs.get("programs_per_sm") == 4:          # a miscompiled launch on this 'GPU'
            out.swaps[0] += 1
        if knobs == {"select": "rows"}:                 # the default launch races: 2nd run differs
            calls["rows"] += 1
            if calls["rows"] == 2:
                out.error_after[1] = float("nan")
        return out

    monkeypatch.setattr(launch_tuning, "_device_name", lambda device: "a test GPU")
    fake_clock["times"] = {"select=stream,programs_per_sm=4": 0.1,
                           "select=stream,num_warps=1,chunk=128,programs_per_sm=16": 0.1,
                           "select=rows,queue_search=serial": 0.7}
    # (not pytest.warns: it would also re-emit the interpreter's own DeprecationWarnings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = launch_tuning.tuned_refine(problem, 16, lambda **knobs: faulty(problem, 16, **knobs))
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 2, messages
    assert "select=rows computed a different result than its own other runs on a test GPU" in messages[0]
    assert "select=stream,programs_per_sm=4 computed a different result than select=stream's" in messages[1]
    assert_same_output(reference_output(*make_layer(6, 64, torch.float16), dk.RefineConfig(
        sparsity=0.6, max_cycle_time=8, update_threshold=0.01))[1], out, "baseline returned")
    (entry,) = launch_tuning.tuned_launches()
    assert entry["launch"] == "select=rows,queue_search=serial"
    assert entry["dropped"] == {
        "select=rows": "output differs from its own other runs",
        "select=stream,programs_per_sm=4": "output differs from select=stream's",
        "select=stream,num_warps=1,chunk=128,programs_per_sm=16":
            "RuntimeError: out of resources: shared memory"}


def test_a_launch_that_breaks_the_context_stops_the_tuning(fake_clock, monkeypatch):
    problem = _problem(3, 64)
    monkeypatch.setattr(launch_tuning, "_context_broken", lambda device: True)
    monkeypatch.setattr(launch_tuning, "_device_name", lambda device: "a test GPU")

    def crashing(**knobs):
        if knobs["select"] == "stream":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return refine_triton(problem, 16, **knobs)

    with pytest.raises(RuntimeError, match="select=stream failed on a test GPU and left its CUDA "
                                           "context unusable"):
        launch_tuning.tuned_refine(problem, 16, crashing)
    assert launch_tuning.tuned_launches() == []


def test_class_key_and_same_output():
    """N:M rows whose groups pad differently get different classes (the row kernel's tile);
    a tile wider than ROWS_MAX_COLS leaves the row kernel out; equal NaNs compare equal."""
    narrow, wide = _problem(1, 12288, "1:3"), _problem(1, 16383, "1:3")
    assert launch_tuning.row_block(narrow) == 16384 and launch_tuning.row_block(wide) == 32768
    assert launch_tuning.problem_class(narrow, 128) != launch_tuning.problem_class(wide, 128)
    assert not any(k["select"] == "rows" for k in launch_tuning.candidates(wide))
    assert any(k["select"] == "rows" for k in launch_tuning.candidates(narrow))
    out = refine_triton(_problem(3, 64), 16, select="rows")
    copy = type(out)(*(t.clone() for t in out))
    out.error_after[0] = copy.error_after[0] = float("nan")
    assert launch_tuning.same_output(out, copy)
    copy.error_after[1] += 1
    assert not launch_tuning.same_output(out, copy)


def test_bad_input_is_judged_before_a_tuning(fake_clock):
    """dk.refine judges NaN before a call that would tune (not after queueing the kernels), so
    bad values never pick a launch; the next good call tunes."""
    w, stats = make_layer(5, 64, torch.float16)
    bad = w.clone()
    bad[2, 7] = float("nan")
    cfg = dk.RefineConfig(sparsity=0.6, max_cycle_time=8)
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        dk.refine(bad.to(DEVICE), stats.to(DEVICE), cfg, backend="triton")
    assert fake_clock["runs"] == {} and launch_tuning.tuned_launches() == []
    res = dk.refine(w.to(DEVICE), stats.to(DEVICE), cfg, backend="triton")
    assert len(launch_tuning.tuned_launches()) == 1 and set(fake_clock["runs"].values()) == {2}   # warm-up + timed
    _, expected = reference_output(w, stats, cfg)
    assert_same_output(expected, (res.pruned_mask, res.swaps, res.error_before, res.error_after), "after")


def test_every_launch_failing_raises_the_first_error(fake_clock):
    problem = _problem(3, 64)

    def broken(**knobs):
        raise ValueError(f"no launch here: {knobs['select']}")

    with pytest.raises(ValueError, match="no launch here: rows"):
        launch_tuning.tuned_refine(problem, 16, broken)
    assert launch_tuning.tuned_launches() == []


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpu_tuned_launch_matches_reference(pattern):
    """Real tuning (CUDA event times) at 4096x4096; the result and the winner's equal the reference."""
    launch_tuning.reset()
    w, stats = make_layer(4096, 4096, torch.float16, seed=3)
    cfg = dk.RefineConfig(sparsity=0.6, pattern=pattern)
    problem, expected = reference_output(w.cuda(), stats.to("cuda"), cfg)
    first = refine_triton(problem)                     # tunes
    assert_same_output(expected, first, f"{pattern} tuning call")
    (entry,) = launch_tuning.tuned_launches()
    assert not any("differs" in why for why in entry["dropped"].values()), entry["dropped"]
    assert entry["launch"] in entry["seconds"]
    assert_same_output(expected, refine_triton(problem), f"{pattern} winner {entry['launch']}")
    launch_tuning.reset()

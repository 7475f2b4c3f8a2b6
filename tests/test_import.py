"""``import dsnot_kernels`` stays lean (DESIGN.md): it works with no GPU, no Triton and no
compiled extension, imports neither transformers nor triton, and does not initialise CUDA.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# A meta-path finder that refuses triton and the compiled extension, as on a machine where
# neither is installed; it must be first so it wins over the real finders.
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("triton", "dsnot_kernels._C")
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, Refuse())
""")

PROBE = textwrap.dedent("""
    import json, sys
    import dsnot_kernels as dk
    import torch
    report = {
        "heavy": sorted(m for m in sys.modules
                        if m.split(".")[0] in ("transformers", "triton", "accelerate", "datasets")
                        or m == "dsnot_kernels._C"),
        "cuda_initialized": torch.cuda.is_initialized(),
        "names": [n for n in dk.__all__ if not hasattr(dk, n)],
    }
    if RUN_REFINE:
        w = torch.randn(4, 16)
        stats = dk.LayerStats(torch.randn(16), torch.rand(16) + 0.5, torch.rand(16), nsamples=2, ntokens=8)
        report["backend"] = dk.refine(w, stats).backend
        report["backend_24"] = dk.refine(w, stats, dk.RefineConfig(pattern="2:4")).backend
        report["available"] = dk.available_backends("cpu", "2:4")
        report["cuda_initialized_after"] = torch.cuda.is_initialized()
        report["heavy_after"] = sorted(m for m in sys.modules
                                       if m.split(".")[0] in ("transformers", "triton"))
    print("REPORT" + json.dumps(report))
""")


def run_probe(blocked: bool, run_refine: bool) -> dict:
    code = (BLOCK if blocked else "") + f"RUN_REFINE = {run_refine}\n" + PROBE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""                      # no GPU, even on a GPU machine
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def test_import_is_lean():
    report = run_probe(blocked=False, run_refine=False)
    assert report["heavy"] == [], f"import dsnot_kernels pulled in {report['heavy']}"
    assert report["cuda_initialized"] is False
    assert report["names"] == [], f"__all__ names missing: {report['names']}"


def test_works_without_triton_and_extension():
    report = run_probe(blocked=True, run_refine=True)
    assert report["heavy"] == [] and report["names"] == []
    assert report["cuda_initialized"] is False
    assert report["backend"] == "torch" and report["backend_24"] == "torch"
    available = report["available"]
    assert available["reference"] is True and available["torch"] is True
    for name in ("triton", "ext"):
        assert isinstance(available[name], str) and available[name], f"{name}: {available[name]!r}"
    assert "blocked by the test" in available["triton"]      # the finder really hid triton
    assert report["cuda_initialized_after"] is False
    assert report["heavy_after"] == []
    # a missing extension reads as "not built" (the blocked finder raises ModuleNotFoundError)
    assert available["ext"].startswith("dsnot_kernels._C is not built"), available["ext"]


def test_extension_load_errors_are_told_apart(monkeypatch):
    """A missing ``_C`` is "not built"; one that exists but fails to load (built against another
    torch, a truncated file) says so and how to rebuild; ``ext.call`` without it raises that
    reason instead of an AttributeError on None."""
    import pytest

    from dsnot_kernels import ext
    missing = ImportError("cannot import name '_C' from 'dsnot_kernels'")
    assert ext._load_error(missing, built=False).startswith("dsnot_kernels._C is not built")
    broken = ext._load_error(ImportError("_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c10"),
                             built=True)
    assert broken.startswith("dsnot_kernels._C is built but cannot be loaded (ImportError: ")
    assert "undefined symbol" in broken and "rebuild it against this torch" in broken
    # "built" means a _C file exists to import, loadable or not
    monkeypatch.setattr(ext.importlib.util, "find_spec", lambda name: object())
    assert ext._is_built()

    def absent(name):
        raise ModuleNotFoundError(name)
    monkeypatch.setattr(ext.importlib.util, "find_spec", absent)
    assert not ext._is_built()
    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_LOAD_ERROR", broken)
    with pytest.raises(RuntimeError, match="is built but cannot be loaded"):
        ext.call("refine_nm")

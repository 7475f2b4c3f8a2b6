"""CMake build of the torch-free core in a temporary directory, then its ctest.

This is how a machine without a GPU compile-checks the CUDA sources: when nvcc is found, the
CMake project compiles csrc/nm_refine_cuda.cu for sm_80 and sm_90 (CMakeLists.txt) and links
it into the core library and csrc/test_nm_core. The ctest executable runs the hand-checkable
CPU cases (and, on a GPU machine, the CUDA path against the CPU path).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")


def _run(cmd, cwd, timeout):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _build(tmp_path) -> Path:
    """Configure and build the core (+ its CUDA path when nvcc is found); the build folder."""
    build = tmp_path / "build"
    configure = [CMAKE, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    log = _run(configure, ROOT, timeout=300)
    want_cuda = shutil.which("nvcc") is not None
    assert f"CUDA path {'ON' if want_cuda else 'OFF'}" in log, log[-2000:]
    _run([CMAKE, "--build", str(build), "--parallel", str(os.cpu_count() or 2)], ROOT, timeout=600)
    if want_cuda:  # the CUDA object exists and embeds code for both architectures
        objects = list(build.rglob("nm_refine_cuda.cu.o"))
        assert objects, "nm_refine_cuda.cu was not compiled"
        blob = objects[0].read_bytes()   # the fatbinary names its ELF targets
        assert b"sm_80" in blob and b"sm_90" in blob, "expected cubins for sm_80 and sm_90"
    return build


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = _build(tmp_path)
    out = _run([shutil.which("ctest") or "ctest", "--test-dir", str(build), "--output-on-failure"],
               ROOT, timeout=300)
    assert "100% tests passed" in out, out
    print(out, file=sys.stderr)


@pytest.mark.gpu
@pytest.mark.skipif(CMAKE is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_core_cuda_checks_run_on_the_gpu(tmp_path):
    """On a GPU machine the C++ test's CUDA cases really run (not skipped): the CUDA path
    against the CPU path on random layers, and dsnot_nm_cuda_probe on this GPU."""
    build = _build(tmp_path)
    out = _run([str(build / "test_nm_core")], ROOT, timeout=300)
    assert "skip: no CUDA device" not in out and "all nm core checks passed" in out, out

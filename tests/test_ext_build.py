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


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler: the build gives up first")
def test_cuda_fallback_keeps_torch_defines(monkeypatch, tmp_path):
    """``DSNOT_BUILD_CUDA=auto``: when the CUDA build fails, the C++-only retry keeps the flags
    torch's ``BuildExtension`` added (``-DTORCH_EXTENSION_NAME=_C`` names the module that
    ``PYBIND11_MODULE`` defines: without it the retried library cannot be imported). Simulated:
    nvcc "found", the first compile fails, nothing is really compiled."""
    from setuptools.command import build_ext as setuptools_build_ext
    from setuptools.dist import Distribution

    monkeypatch.syspath_prepend(str(ROOT))
    import build_extension
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSNOT_BUILD_EXT", raising=False)
    monkeypatch.delenv("DSNOT_BUILD_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(build_extension, "_cuda_problem", lambda torch, cpp_extension: None)
    make = build_extension._make_extension

    def cuda_like(cpp_extension, flags, with_cuda):      # a CPU torch cannot make a CUDAExtension
        ext = make(cpp_extension, flags, False)
        if with_cuda:
            ext.extra_compile_args = {"cxx": list(flags["DSNOT_CXX_FLAGS"]), "nvcc": ["-O3"]}
        return ext
    monkeypatch.setattr(build_extension, "_make_extension", cuda_like)
    compiled = []

    def compile_once(self, ext):
        compiled.append({k: list(v) for k, v in ext.extra_compile_args.items()})
        if len(compiled) == 1:
            raise RuntimeError("nvcc failed (simulated)")
    monkeypatch.setattr(setuptools_build_ext.build_ext, "build_extension", compile_once)
    cmd = Distribution({"name": "probe", **build_extension.extension_setup_kwargs()}).get_command_obj("build_ext")
    cmd.ensure_finalized()
    cmd.run()
    assert len(compiled) == 2 and "nvcc" in compiled[0] and "nvcc" not in compiled[1], compiled
    assert "-DTORCH_EXTENSION_NAME=_C" in compiled[0]["cxx"]          # what torch adds
    assert set(compiled[0]["cxx"]) == set(compiled[1]["cxx"]), compiled


def test_sdist_holds_what_the_build_needs(tmp_path):
    """A source distribution builds the extension only if it carries build_extension.py,
    CMakeLists.txt (the compile flags) and every csrc/ source and header (MANIFEST.in):
    setuptools alone packs only the listed .cpp sources. Built from a copy, so that the
    checkout gets no egg-info."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".hypothesis",
        ".pytest_cache", ".cache", "results"))
    env = dict(os.environ, DSNOT_BUILD_EXT="0")     # no ext_modules: MANIFEST.in alone must list csrc/
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import tarfile
    (archive,) = (tmp_path / "dist").glob("dsnot_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"setup.py", "pyproject.toml", "build_extension.py", "CMakeLists.txt", "MANIFEST.in"}
    needed |= {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h", ".cu")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "dsnot_kernels").rglob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "python").rglob("*.py")}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

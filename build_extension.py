"""How setup.py builds the optional extension ``dsnot_kernels._C`` from csrc/.

``extension_setup_kwargs()`` returns extra ``setup()`` keyword arguments (``ext_modules`` and
``cmdclass``); an empty dict means "no extension". The package works without the extension
(torch and triton backends).

Switches (environment variables):

| variable          | values          | meaning                                                   |
|-------------------|-----------------|-----------------------------------------------------------|
| DSNOT_BUILD_EXT   | auto (default)  | build; if that fails, warn and install without it         |
|                   | 1               | build; a failure is an error                              |
|                   | 0               | skip the extension                                        |
| DSNOT_BUILD_CUDA  | auto (default)  | add the CUDA path if torch has CUDA and nvcc is found; if  |
|                   |                 | that build fails, warn and build the CPU path alone        |
|                   | 1               | the CUDA path is required                                 |
|                   | 0               | CPU path only                                             |

Compile flags are not written here: they are read from the ``set(DSNOT_*_FLAGS ...)`` lines of
CMakeLists.txt, the single place for them (the torch-free CMake build uses the same lists).
Only csrc/binding.cpp includes torch headers (about 40 s to compile); the core files do not.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/binding.cpp", f"{CSRC}/nm_refine_cpu.cpp", f"{CSRC}/unstructured_refine_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/nm_refine_cuda.cu"]
EXT_NAME = "dsnot_kernels._C"
MODES = ("auto", "0", "1")


def _say(message: str) -> None:
    print(f"dsnot_kernels: {message}", flush=True)


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise SystemExit(f"{name} must be one of {MODES}, got {value!r}")
    return value


def cmake_flags() -> Dict[str, List[str]]:
    """The ``DSNOT_CXX_FLAGS``, ``DSNOT_CUDA_FLAGS`` and ``DSNOT_CUDA_ARCHS`` lists of CMakeLists.txt."""
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        text = f.read()
    flags = {}
    for name in ("DSNOT_CXX_FLAGS", "DSNOT_CUDA_FLAGS", "DSNOT_CUDA_ARCHS"):
        match = re.search(rf"^\s*set\(\s*{name}\s+([^)]*)\)", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"CMakeLists.txt has no one-line set({name} ...)")
        flags[name] = match.group(1).split()
    return flags


def _cuda_problem(torch, cpp_extension) -> str | None:
    """None if the CUDA path can be built, else why not."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    home = cpp_extension.CUDA_HOME
    if home is None or shutil.which(os.path.join(home, "bin", "nvcc")) is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={home} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)"
    return None


# Python's own CFLAGS carry -g: without this the module is ~12 MB of debug information
# around ~0.4 MB of code (measured, CPU path). GNU ld / lld syntax, hence Linux only. (The one
# flag not in CMakeLists.txt: the CMake build links no Python module.)
LINK_FLAGS = ["-Wl,--strip-debug"] if sys.platform.startswith("linux") else []


def _make_extension(cpp_extension, flags: Dict[str, List[str]], with_cuda: bool):
    cxx = list(flags["DSNOT_CXX_FLAGS"])
    if with_cuda:
        nvcc = list(flags["DSNOT_CUDA_FLAGS"]) + ["-std=c++17"]
        return cpp_extension.CUDAExtension(
            EXT_NAME, CPU_SOURCES + CUDA_SOURCES, include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=[("DSNOT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=LINK_FLAGS)
    return cpp_extension.CppExtension(
        EXT_NAME, CPU_SOURCES, include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx}, extra_link_args=LINK_FLAGS)


def extension_setup_kwargs() -> dict:
    """``setup()`` keyword arguments that build ``dsnot_kernels._C`` (or ``{}`` to skip it)."""
    mode, cuda_mode = _switch("DSNOT_BUILD_EXT"), _switch("DSNOT_BUILD_CUDA")
    if mode == "0":
        _say("extension skipped (DSNOT_BUILD_EXT=0)")
        return {}

    def give_up(reason: str) -> dict:
        if mode == "1":
            raise SystemExit(f"dsnot_kernels: DSNOT_BUILD_EXT=1 but the extension cannot be built: {reason}")
        _say(f"WARNING: extension not built ({reason}); the torch/triton backends still work")
        return {}

    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - e.g. build isolation without torch
        return give_up(f"torch is not importable: {type(exc).__name__}: {exc}; "
                       f"install with pip install --no-build-isolation [-e] . into an environment "
                       f"that has torch")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return give_up(f"no C++ compiler ({compiler!r} not found)")
    flags = cmake_flags()

    cuda_reason = "DSNOT_BUILD_CUDA=0" if cuda_mode == "0" else _cuda_problem(torch, cpp_extension)
    if cuda_reason is not None and cuda_mode == "1":
        raise SystemExit(f"dsnot_kernels: DSNOT_BUILD_CUDA=1 but the CUDA path cannot be built: {cuda_reason}")
    with_cuda = cuda_reason is None
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # sm_80 and sm_90 as in CMakeLists.txt, never the build machine's own GPU only, plus the
        # newest one's PTX, which the driver compiles for GPUs newer than the list (Blackwell)
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
            f"{a[:-1]}.{a[-1]}" for a in flags["DSNOT_CUDA_ARCHS"]) + "+PTX"

    class BuildDsnotExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the DSNOT_BUILD_* fallbacks and a one-line summary."""

        def build_extensions(self):
            try:  # torch checks the compiler here, before any build_extension call
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                if mode == "1":
                    raise
                for ext in list(self.extensions):
                    self._drop(ext, exc)

        def build_extension(self, ext):
            nonlocal with_cuda
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compile/link errors of any kind
                if not (with_cuda and cuda_mode == "auto"):
                    if mode == "1":
                        raise
                    self._drop(ext, exc)
                    return
                _say(f"WARNING: the CUDA build failed ({type(exc).__name__}: {exc}); "
                     f"retrying with the C++ CPU path only")
                with_cuda = False
                cpu_ext = _make_extension(cpp_extension, flags, with_cuda=False)
                # keep what torch's build_extensions added to the C++ flags (the module name
                # TORCH_EXTENSION_NAME that PYBIND11_MODULE uses, the ABI flag): without them the
                # retry would build a library that cannot be imported
                torch_added = [f for f in ext.extra_compile_args.get("cxx", []) if f not in flags["DSNOT_CXX_FLAGS"]]
                cpu_ext.extra_compile_args["cxx"] += torch_added
                ext.sources, ext.define_macros = cpu_ext.sources, cpu_ext.define_macros
                ext.extra_compile_args, ext.libraries = cpu_ext.extra_compile_args, cpu_ext.libraries
                ext.library_dirs, ext.include_dirs = cpu_ext.library_dirs, cpu_ext.include_dirs
                try:
                    super().build_extension(ext)
                except Exception as exc2:  # noqa: BLE001
                    if mode == "1":
                        raise
                    self._drop(ext, exc2)
                    return
            paths = "C++ CPU path + CUDA path (TORCH_CUDA_ARCH_LIST " + os.environ.get(
                "TORCH_CUDA_ARCH_LIST", "") + ")" if with_cuda else \
                f"C++ CPU path only (no CUDA path: {cuda_reason or 'its build failed'})"
            _say(f"built extension {EXT_NAME}: {paths}")

        def _drop(self, ext, exc: Exception) -> None:
            _say(f"WARNING: extension {EXT_NAME} not built ({type(exc).__name__}: {exc}); "
                 f"the torch/triton backends still work")
            # An editable install copies every output of build_ext: leave an empty module
            # list behind so it does not look for the missing library, and remove a stale
            # in-place library from an earlier build so that it cannot be loaded by mistake.
            if ext in self.extensions:
                self.extensions.remove(ext)
            for stale in glob.glob(os.path.join(ROOT, "dsnot_kernels", "_C*.so")):
                os.remove(stale)
                _say(f"removed the stale {os.path.relpath(stale, ROOT)}")

    ext = _make_extension(cpp_extension, flags, with_cuda)
    plan = "C++ CPU path + CUDA path" if with_cuda else f"C++ CPU path ({cuda_reason})"
    _say(f"extension {EXT_NAME} will be built: {plan}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildDsnotExtension}}


if __name__ == "__main__":
    print(cmake_flags())
    sys.exit(0)

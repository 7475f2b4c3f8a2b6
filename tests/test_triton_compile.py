"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, sm_75 (a T4: where
the extension's CUDA path cannot run, ``auto`` takes Triton for N:M too), Blackwell's sm_100
(B200) and sm_120 (RTX 50 series), and AMD's gfx942 (MI300), whose ROCm torch calls it a
"cuda" device too (no GPU needed; no kernel has run on an AMD GPU).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs Triton's real CUDA
code generation (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas). It must run with
``TRITON_INTERPRET`` unset, which conftest sets for this process, so each compile runs in a
subprocess with a clean environment. Shapes are LLaMA-like (in = 4096 / 11008 padded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TRITON = pytest.importorskip("triton")

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

# in a subprocess with TRITON_INTERPRET unset; the kernels' signatures, constants and options
# are benchmarks/aot_kernels.py's (one place, shared with its SASS census)
SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    sys.path.insert(0, sys.argv[1])
    from aot_kernels import compile_case

    case, arch, dtype, cap = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    if arch.startswith("gfx"):       # AMD: the workgroup size the code was built for
        k = compile_case(case, arch, dtype, cap, jit_like=False)
        asm = k.asm["amdgcn"]
        target = re.search(r'\.amdgcn_target\s+"[^"]*-' + arch + r'\b', asm) is not None
        most = int(re.search(r"\.max_flat_workgroup_size:\s*(\d+)", asm).group(1))
        code, binary = asm, k.asm["hsaco"]
    else:
        k = compile_case(case, int(arch), dtype, cap, jit_like=False)
        code, binary = k.asm["ptx"], k.asm["cubin"]
        target, most = f".target sm_{arch}" in code, 1024
    print(json.dumps(dict(code=len(code), binary=len(binary), target=target, shared=k.metadata.shared,
                          threads=k.metadata.num_warps * k.metadata.warp_size, most_threads=most)))
""")


def _compile(case: str, cc: int | str, dtype: str, cap: int = 128) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, BENCH_DIR, case, str(cc), dtype, str(cap)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{case} sm_{cc} cap {cap}: compile failed\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


sys.path.insert(0, BENCH_DIR)
from aot_kernels import CASES  # noqa: E402  (case -> weight dtype; imports no Triton)


@pytest.mark.parametrize("cc", [75, 80, 90, 100, 120], ids=lambda cc: f"sm_{cc}")
@pytest.mark.parametrize("case,dtype", list(CASES.items()), ids=[f"{c}-{d}" for c, d in CASES.items()])
def test_kernel_compiles_for_cuda(case, dtype, cc):
    info = _compile(case, cc, dtype)
    assert info["code"] > 0 and info["binary"] > 0, info
    assert info["target"], f"PTX not for sm_{cc}: {info}"
    assert info["threads"] <= info["most_threads"], info


@pytest.mark.parametrize("arch", ["gfx942"])
@pytest.mark.parametrize("case,dtype", list(CASES.items()), ids=[f"{c}-{d}" for c, d in CASES.items()])
def test_kernel_compiles_for_amd(case, dtype, arch):
    """With the launch options the launcher gives a 64-lane AMD GPU (ops.refine: no register
    cap, at most 16 warps): a launch on 32 warps (the row kernel's choice for 16384-wide rows
    with 32-lane warps) would have 2048 threads, twice what the code is built for."""
    info = _compile(case, arch, dtype)
    assert info["code"] > 0 and info["binary"] > 0, info
    assert info["target"], f"code not for {arch}: {info}"
    assert info["threads"] <= info["most_threads"], info


@pytest.mark.parametrize("case,dtype,cap", [("select-unstructured", "fp16", 1024), ("stream-unstructured", "fp16", 1024),
                                            ("select-nm", "bf16", 2048), ("stream-nm", "bf16", 2048)],
                         ids=lambda v: f"cap{v}" if isinstance(v, int) else v)
def test_queue_sort_shared_memory(case, dtype, cap):
    """``ops.refine.limit_reason`` bounds ``max_cycle_time`` by the ``[NQ, CAP]`` int64 queue
    sort's shared memory, ``NQ * CAP * 8`` bytes: the sm_90 cubins of both select kernels
    never need more (a launch it lets through fits), and with Triton 3.6 (the GPU machine's)
    need exactly that once the sort is their largest shared buffer. (Triton 3.9 sorts with
    less shared memory: the bound is then conservative.)"""
    info = _compile(case, 90, dtype, cap)
    nq = 2 if "-nm" in case else 4
    assert info["shared"] <= nq * cap * 8, f"{case} cap {cap}: {info['shared']} B of shared memory"
    if TRITON.__version__.startswith("3.6."):
        assert info["shared"] == nq * cap * 8, f"{case} cap {cap}: {info['shared']} B of shared memory"


def test_sass_census(tmp_path):
    """``benchmarks/aot_kernels.py`` (the census a session without a GPU reads): compiled as a
    launch on LLaMA shapes compiles them (arguments divisible by 16), the streamed unstructured
    kernel stays within its register cap with no spill inside its passes, the census finds
    those passes (the innermost loops) and attributes them to kernel functions, and it tells
    the joint queue search (one compaction scan for all queues) from the serial one (a search
    and a compaction per queue)."""
    from dsnot_kernels.ops.refine import STREAM_MAXNREG
    out = tmp_path / "census.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "aot_kernels.py"), "--cases",
                           "stream-unstructured,stream-unstructured-serial", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    joint, serial = json.loads(out.read_text())
    assert "stream-unstructured (fp16, sm_90)" in proc.stdout
    functions = {}
    for name, info in (("joint", joint), ("serial", serial)):
        assert 0 < info["registers"] <= STREAM_MAXNREG, info["registers"]
        assert len(info["loops"]) >= 5, info["loops"]
        functions[name] = " ".join(" ".join(loop["origins"]) for loop in info["loops"])
        assert "_kth_search" in functions[name] or "_count3" in functions[name], functions[name]
    # at its 128-register cap (four programs per SM) it spills a few values once per row, never
    # inside a pass over the row
    assert all(loop["spills"] == 0 for loop in joint["loops"]), joint["loops"]
    assert "_joint_search" in functions["joint"] and "_compact_joint" in functions["joint"]
    assert "_compact " not in functions["joint"] + " "
    assert "_compact " in functions["serial"] + " " and "_compact_joint" not in functions["serial"]
    bad = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "aot_kernels.py"), "--cases", "nope"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--cases" in bad.stderr

"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, and sm_75 (a T4: where
the extension's CUDA path cannot run, ``auto`` takes Triton for N:M too) (no GPU needed).

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

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsnot_kernels.ops.refine_cycles import cycles_kernel
    from dsnot_kernels.ops.refine_select import select_kernel
    from dsnot_kernels.ops.refine_select_stream import select_stream_kernel
    from dsnot_kernels.ops.stats_kernel import stats_kernel

    case, cc = sys.argv[1], int(sys.argv[2])
    W = "*" + sys.argv[3]
    cap = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    if case.startswith("stream"):
        fn, warps = select_stream_kernel, 1 if case.endswith("-1warp") else 4
        sig = dict(w_ptr=W, s_ptr="*fp32", sq_ptr="*fp32", vp_ptr="*fp32", scale_ptr="*fp32",
                   iscore_ptr="*fp32", imask_ptr="*u8", mask_ptr="*u8", e0_ptr="*fp64",
                   queue_ptr="*i32", qd_ptr="*fp32", qa_ptr="*fp32", key_ptr="*i32", set_ptr="*i8",
                   scratch_ptr="*i64", rows="i32", cols="i32", stride_w="i32", stride_is="i32",
                   stride_im="i32", stride_m="i32", pruned_per_row="i32", depth="i32")
        nm = case.startswith("stream-nm")
        const = dict(IS_NM=nm, N=2 if nm else 0, M=4 if nm else 1, MPAD=4 if nm else 16384,
                     HAS_MASK=False, HAS_SCORE=False, NQ=2 if nm else 4, TPAD=64, CAP=cap,
                     STORE_A=not nm, CHUNK=128 if case.endswith(("-narrow", "-1warp")) else 1024,
                     JOINT=not case.endswith("-serial"), SMALL=64)
    elif case.startswith("select"):
        fn, warps = select_kernel, 8
        sig = dict(w_ptr=W, s_ptr="*fp32", sq_ptr="*fp32", vp_ptr="*fp32", scale_ptr="*fp32",
                   iscore_ptr="*fp32", imask_ptr="*u8", mask_ptr="*u8", e0_ptr="*fp64",
                   queue_ptr="*i32", qd_ptr="*fp32", qa_ptr="*fp32", scratch_ptr="*i64", rows="i32", cols="i32", stride_w="i32",
                   stride_is="i32", stride_im="i32", stride_m="i32", pruned_per_row="i32", depth="i32")
        nm = case.startswith("select-nm")
        const = dict(IS_NM=nm, N=2 if nm else 0, M=4 if nm else 1, GPAD=1024 if nm else 1,
                     MPAD=4 if nm else 4096, HAS_MASK=False, HAS_SCORE=False,
                     NQ=2 if nm else 4, TPAD=64, CAP=cap, STORE_A=not nm,
                     JOINT=not case.endswith("-serial"), SEEDED=case.endswith("-seeded"))
    elif case.startswith("cycles"):
        fn, warps = cycles_kernel, 4
        sig = dict(w_ptr=W, s_ptr="*fp32", sq_ptr="*fp32", scale_ptr="*fp32", iscore_ptr="*fp32",
                   params_ptr="*fp64", mask_ptr="*u8", e_ptr="*fp64", queue_ptr="*i32",
                   qd_ptr="*fp32", qa_ptr="*fp32",
                   swaps_ptr="*i32", e_before_ptr="*fp32", e_out_ptr="*fp32", rows="i32", cols="i32", stride_w="i32",
                   stride_is="i32", stride_m="i32", cycles="i32")
        nm = case == "cycles-nm"
        const = dict(IS_NM=nm, M=4 if nm else 1, MPAD=4 if nm else 1, HAS_SCORE=False,
                     SIGN_CHECK=True, IMPROVE_CHECK=True, MOMENT_CHECK=True,
                     NQ=2 if nm else 4, TPAD=64, HPAD=64 if nm else 1, BLOCK_R=4 if nm else 128)
    else:
        fn, warps = stats_kernel, 4
        sig = dict(x_ptr=W, out_ptr="*fp64", seq="i32", width="i32", stride_b="i32", stride_t="i32")
        const = dict(BLOCK_T=32, BLOCK_C=64)
    sig.update({k: "constexpr" for k in const})
    options = dict(num_warps=warps, enable_fp_fusion=False)
    if case.startswith("stream-unstructured") and warps >= 4:
        from dsnot_kernels.ops.refine import STREAM_MAXNREG
        options["maxnreg"] = STREAM_MAXNREG           # as the launcher caps it
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", cc, 32), options=options)
    ptx = k.asm["ptx"]
    print(json.dumps(dict(ptx=len(ptx), cubin=len(k.asm["cubin"]), target=f".target sm_{cc}" in ptx,
                          local=ptx.count("st.local"), shared=k.metadata.shared)))
""")

CASES = [("select-unstructured", "fp16"), ("select-unstructured-seeded", "fp16"), ("select-nm", "bf16"), ("stream-unstructured", "fp16"),
         ("stream-nm", "bf16"), ("select-unstructured-serial", "fp16"), ("stream-nm-serial", "bf16"),
         ("stream-unstructured-narrow", "fp16"), ("stream-unstructured-1warp", "fp16"),
         ("stream-nm-1warp", "bf16"),
         ("cycles-unstructured", "fp16"),
         ("cycles-nm", "fp32"), ("stats", "fp16")]


@pytest.mark.parametrize("cc", [75, 80, 90], ids=lambda cc: f"sm_{cc}")
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{d}" for c, d in CASES])
def test_kernel_compiles_for_cuda(case, dtype, cc):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case, str(cc), dtype], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{case} sm_{cc}: compile failed\n{proc.stderr[-4000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["ptx"] > 0 and info["cubin"] > 0, info
    assert info["target"], f"PTX not for sm_{cc}: {info}"


@pytest.mark.parametrize("case,dtype,cap", [("select-unstructured", "fp16", 1024), ("stream-unstructured", "fp16", 1024),
                                            ("select-nm", "bf16", 2048), ("stream-nm", "bf16", 2048)],
                         ids=lambda v: f"cap{v}" if isinstance(v, int) else v)
def test_queue_sort_shared_memory(case, dtype, cap):
    """``ops.refine.limit_reason`` bounds ``max_cycle_time`` by the ``[NQ, CAP]`` int64 queue
    sort's shared memory, ``NQ * CAP * 8`` bytes: the sm_90 cubins of both select kernels
    never need more (a launch it lets through fits), and with Triton 3.6 (the GPU machine's)
    need exactly that once the sort is their largest shared buffer. (Triton 3.9 sorts with
    less shared memory: the bound is then conservative.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case, "90", dtype, str(cap)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{case} cap {cap}: compile failed\n{proc.stderr[-4000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    nq = 2 if "-nm" in case else 4
    assert info["shared"] <= nq * cap * 8, f"{case} cap {cap}: {info['shared']} B of shared memory"
    if TRITON.__version__.startswith("3.6."):
        assert info["shared"] == nq * cap * 8, f"{case} cap {cap}: {info['shared']} B of shared memory"

"""Compile the Triton kernels for a CUDA GPU without one, and count what their machine code does.

    python benchmarks/aot_kernels.py                          # census of the select kernels, sm_90
    python benchmarks/aot_kernels.py --cases stream-unstructured,stream-nm --cc 80 --json out.json

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs Triton's real code
generation (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) on a machine without a GPU
(ENV.md). ``compile_case`` builds each kernel with the signature, compile-time constants and
options its launcher in ``dsnot_kernels/ops/refine.py`` uses on LLaMA-like rows (in = 4096,
or 11008 padded), and by default with the argument hints a real launch gets: Triton's JIT marks
every pointer and integer argument divisible by 16 (``tt.divisibility``), which lets it vectorise
loads and stores, so the code differs from a hint-free compile (registers included).

The census (this file's command line) is for sessions without a GPU: it disassembles each
cubin (the ``nvdisasm`` shipped with Triton) and prints its registers, stack, shared memory and,
for every innermost loop of the SASS, its instructions per iteration, its barriers
(``BAR``), its warp shuffles (``SHFL``) and the kernel functions its instructions come from.
Those loops are the kernels' passes over a row's columns; a latency-bound kernel pays for each
barrier inside them on every chunk of every row. These are static counts (instructions per
iteration, not instructions executed; Triton may unroll a loop), not timings.

Compiling needs ``TRITON_INTERPRET`` unset when Triton loads (the interpreter does not
compile): the command line removes it first; ``compile_case`` refuses to run under it.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# case -> the default weight dtype used by the census; every case compiles for any dtype
CASES = {
    "select-unstructured": "fp16", "select-unstructured-seeded": "fp16",
    "select-unstructured-wide": "fp16", "select-nm": "bf16",
    "stream-unstructured": "fp16", "stream-nm": "bf16", "select-unstructured-serial": "fp16",
    "stream-nm-serial": "bf16", "stream-unstructured-narrow": "fp16",
    "stream-unstructured-1warp": "fp16", "stream-nm-1warp": "bf16", "stream-unstructured-serial": "fp16",
    "cycles-unstructured": "fp16", "cycles-nm": "fp32", "stats": "fp16",
}
CENSUS_CASES = ("select-unstructured", "select-unstructured-seeded", "stream-unstructured",
                "stream-unstructured-1warp", "stream-nm")
# integer arguments whose values a launch on LLaMA shapes makes multiples of 16 (rows, columns,
# row strides; 0 for the absent initial score/mask): the JIT marks them divisible by 16
ALIGNED_INTS = ("rows", "cols", "stride_w", "stride_is", "stride_im", "stride_m", "seq", "width",
                "stride_b", "stride_t")


def kernel_spec(case: str, dtype: str, cap: int = 128, warp: int = 32, nvidia: bool = True):
    """``(kernel, signature, constexprs, options)`` of one case (``CASES``), as its launcher
    builds them for a GPU with ``warp``-thread warps (AMD's datacenter GPUs: 64), on NVIDIA's
    Triton backend or not (AMD's has no register cap option); ``dtype`` is the weight (or
    activation) dtype: ``fp16``, ``bf16`` or ``fp32``; ``cap`` the queue line length ``CAP``."""
    from dsnot_kernels.ops.refine import _num_warps, launch_options, stream_mask_chunk
    from dsnot_kernels.ops.refine_cycles import cycles_kernel
    from dsnot_kernels.ops.refine_select import select_kernel
    from dsnot_kernels.ops.refine_select_stream import select_stream_kernel
    from dsnot_kernels.ops.stats_kernel import stats_kernel

    if case not in CASES:
        raise ValueError(f"case must be one of {sorted(CASES)}, got {case!r}")
    w = "*" + dtype
    nm = "-nm" in case
    if case.startswith("stream"):
        fn, warps = select_stream_kernel, 1 if case.endswith("-1warp") else 4
        chunk = 128 if case.endswith(("-narrow", "-1warp")) else 1024
        sig = dict(w_ptr=w, s_ptr="*fp32", sq_ptr="*fp32", vp_ptr="*fp32", scale_ptr="*fp32",
                   iscore_ptr="*fp32", imask_ptr="*u8", mask_ptr="*u8", e0_ptr="*fp64",
                   queue_ptr="*i32", qd_ptr="*fp32", qa_ptr="*fp32", key_ptr="*i32", set_ptr="*i8",
                   scratch_ptr="*i64", rows="i32", cols="i32", stride_w="i32", stride_is="i32",
                   stride_im="i32", stride_m="i32", pruned_per_row="i32", depth="i32")
        const = dict(IS_NM=nm, N=2 if nm else 0, M=4 if nm else 1, MPAD=4 if nm else 16384,
                     HAS_MASK=False, HAS_SCORE=False, NQ=2 if nm else 4, TPAD=64, CAP=cap,
                     STORE_A=not nm, CHUNK=chunk, MASK_CHUNK=stream_mask_chunk(chunk, warps, nm),
                     JOINT=not case.endswith("-serial"))
    elif case.startswith("select"):
        wide = case.endswith("-wide")      # LLaMA's down_proj rows (11008 columns) in registers
        fn, warps = select_kernel, _num_warps(16384 if wide else 4096, "-nm" in case, warp)
        sig = dict(w_ptr=w, s_ptr="*fp32", sq_ptr="*fp32", vp_ptr="*fp32", scale_ptr="*fp32",
                   iscore_ptr="*fp32", imask_ptr="*u8", mask_ptr="*u8", e0_ptr="*fp64",
                   queue_ptr="*i32", qd_ptr="*fp32", qa_ptr="*fp32", scratch_ptr="*i64", rows="i32",
                   cols="i32", stride_w="i32", stride_is="i32", stride_im="i32", stride_m="i32",
                   pruned_per_row="i32", depth="i32")
        const = dict(IS_NM=nm, N=2 if nm else 0, M=4 if nm else 1, GPAD=1024 if nm else 1,
                     MPAD=4 if nm else 16384 if wide else 4096, HAS_MASK=False, HAS_SCORE=False,
                     NQ=2 if nm else 4, TPAD=64, CAP=cap, STORE_A=not nm,
                     JOINT=not case.endswith("-serial"), SEEDED=case.endswith("-seeded"))
    elif case.startswith("cycles"):
        # rows per program and warps as the launcher picks them for T = 50: 128 rows on 4 warps
        # (unstructured), 4 rows on one warp (N:M, whose [rows, 64] history tiles are wide)
        fn, warps = cycles_kernel, 1 if "-nm" in case else 4
        sig = dict(w_ptr=w, s_ptr="*fp32", sq_ptr="*fp32", scale_ptr="*fp32", iscore_ptr="*fp32",
                   params_ptr="*fp64", mask_ptr="*u8", e_ptr="*fp64", queue_ptr="*i32",
                   qd_ptr="*fp32", qa_ptr="*fp32", swaps_ptr="*i32", e_before_ptr="*fp32",
                   e_out_ptr="*fp32", rows="i32", cols="i32", stride_w="i32", stride_is="i32",
                   stride_m="i32", cycles="i32")
        const = dict(IS_NM=nm, M=4 if nm else 1, MPAD=4 if nm else 1, HAS_SCORE=False,
                     SIGN_CHECK=True, IMPROVE_CHECK=True, MOMENT_CHECK=True,
                     NQ=2 if nm else 4, TPAD=64, HPAD=64 if nm else 1, BLOCK_R=4 if nm else 128)
    else:
        fn, warps = stats_kernel, 4
        sig = dict(x_ptr=w, out_ptr="*fp64", seq="i32", width="i32", stride_b="i32", stride_t="i32")
        const = dict(BLOCK_T=32, BLOCK_C=64)
    sig.update({k: "constexpr" for k in const})
    # as the launcher caps it; AMD's Triton backend has no register cap (ops.refine.REGISTER_CAP_OPTION)
    options = launch_options(warps, capped=case.startswith("stream-unstructured") and warps >= 4 and nvidia)
    return fn, sig, const, options


def compile_case(case: str, cc: int | str, dtype: str, cap: int = 128, jit_like: bool = True):
    """Triton's ``CompiledKernel`` of ``case`` for ``sm_<cc>`` (``asm["ptx"]``, ``asm["cubin"]``,
    ``metadata.shared``), or for an AMD GPU when ``cc`` is its architecture name, e.g.
    ``"gfx942"`` (MI300; ``asm["amdgcn"]``, ``asm["hsaco"]``). ``jit_like``: with the
    divisibility hints a launch on LLaMA shapes gets (pointers and ``ALIGNED_INTS`` divisible
    by 16); else none."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_case needs TRITON_INTERPRET unset before triton is imported "
                           "(run benchmarks/aot_kernels.py, or a subprocess without it)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if isinstance(cc, str):
        # Triton runs a wavefront as a warp: 64 lanes on the datacenter GPUs (gfx9), 32 on RDNA
        target = GPUTarget("hip", cc, 64 if cc.startswith("gfx9") else 32)
    else:
        target = GPUTarget("cuda", cc, 32)
    fn, sig, const, options = kernel_spec(case, dtype, cap, target.warp_size, target.backend == "cuda")
    attrs = {}
    if jit_like:
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, kind in sig.items() if kind.startswith("*") or name in ALIGNED_INTS}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=target, options=options)


def _tool(name: str) -> str:
    """Path of a CUDA binary utility shipped with Triton (``nvdisasm``, ``cuobjdump``)."""
    from triton import knobs
    path = getattr(knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found (Triton's NVIDIA backend ships it under "
                                f"triton/backends/nvidia/bin; got {path!r}): the census needs it")
    return path


def _run_on_cubin(tool: str, flags: list[str], cubin: bytes) -> str:
    """Standard output of Triton's ``tool`` run with ``flags`` on ``cubin`` (via a temporary file)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """``{"registers", "stack", "local"}`` per thread from ``cuobjdump -res-usage``."""
    out = _run_on_cubin("cuobjdump", ["-res-usage"], cubin)
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return {"registers": usage.get("reg"), "stack": usage.get("stack"), "local": usage.get("local")}


def _function_at(path: str, line: int, cache: dict) -> str:
    """Name of the innermost Python function of ``path`` that holds ``line`` ("?" if unknown)."""
    if path not in cache:
        spans = []
        try:
            tree = ast.parse(Path(path).read_text())
            spans = [(node.lineno, node.end_lineno, node.name) for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef)]
        except (OSError, SyntaxError):
            pass
        cache[path] = spans
    inside = [(end - start, name) for start, end, name in cache[path] if start <= line <= end]
    return min(inside)[1] if inside else "?"


def parse_sass(text: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """``nvdisasm -c -g`` output as ``(instructions, labels)``: ``(address, instruction,
    origin)`` of each instruction, origin being ``file.py:function`` of the line-info comment
    above it (Triton's own helpers, such as ``tl.sum``, under their module's name); and the
    address of each label (branch target)."""
    out, origin, label, labels = [], "?", None, {}
    functions: dict = {}
    for raw in text.splitlines():
        m = re.match(r'\s*//## File "(.*?)", line (\d+)', raw)
        if m:
            path, line = m.group(1), int(m.group(2))
            origin = f"{Path(path).name}:{_function_at(path, line, functions)}"
            continue
        m = re.match(r"^(\.L_x_\d+):", raw)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m:
            address = int(m.group(1), 16)
            if label is not None:
                labels[label] = address
                label = None
            out.append((address, m.group(2), origin))
    return out, labels


def _is_spill(instruction: str) -> bool:
    """A local-memory load or store (``LDL``/``STL``): registers spilled to the stack."""
    return re.search(r"\b(LDL|STL)\b", instruction) is not None


def _counts(instructions) -> dict:
    """``{"instructions", "barriers", "shuffles", "spills"}`` of a sequence of SASS instructions."""
    instructions = list(instructions)
    return {"instructions": len(instructions),
            "barriers": sum("BAR." in ins for ins in instructions),
            "shuffles": sum("SHFL" in ins for ins in instructions),
            "spills": sum(_is_spill(ins) for ins in instructions)}


def innermost_loops(instructions: list[tuple[int, str, str]], labels: dict[str, int]) -> list[dict]:
    """Every innermost loop of a :func:`parse_sass` listing (a backward branch whose range holds
    no other): ``{"start", "end", "instructions", "barriers", "shuffles", "spills", "origins"}``
    (spills: local-memory loads and stores; origins: the three functions contributing most
    instructions, with their counts)."""
    spans = set()
    for address, instruction, _ in instructions:
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", instruction)
        if m and m.group(1) in labels and labels[m.group(1)] <= address:
            spans.add((labels[m.group(1)], address))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for start, end in sorted(inner):
        body = [(ins, origin) for address, ins, origin in instructions if start <= address <= end]
        if len(body) < 2:
            continue
        origins = collections.Counter(origin for _, origin in body).most_common(3)
        loops.append({"start": start, "end": end, **_counts(ins for ins, _ in body),
                      "origins": [f"{name} {count}" for name, count in origins]})
    return loops


def census(case: str, cc: int = 90, dtype: str | None = None, cap: int = 128) -> dict:
    """Resources and innermost loops of one case's cubin for ``sm_<cc>`` (JIT-like hints)."""
    dtype = dtype or CASES[case]
    kernel = compile_case(case, cc, dtype, cap)
    cubin = kernel.asm["cubin"]
    instructions, labels = parse_sass(_run_on_cubin("nvdisasm", ["-c", "-g"], cubin))
    usage = resource_usage(cubin)
    usage["shared"] = kernel.metadata.shared           # Triton's dynamic shared memory, bytes
    return {"case": case, "cc": cc, "dtype": dtype, **usage,
            **_counts(ins for _, ins, _ in instructions),
            "loops": innermost_loops(instructions, labels)}


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)      # before triton is imported
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CENSUS_CASES),
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--cc", type=int, default=90, help="compute capability (80, 90, ...)")
    parser.add_argument("--json", type=Path, help="also write the census here")
    args = parser.parse_args(argv)
    if not 70 <= args.cc < 200:           # Triton's NVIDIA backend targets sm_70 and newer
        parser.error(f"--cc: expected a compute capability such as 80 or 90 (sm_70 or newer), got {args.cc}")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"--cases: expected a comma-separated list of {', '.join(CASES)}; got {args.cases!r}")
    results = []
    for case in cases:
        info = census(case, args.cc)
        results.append(info)
        print(f"{case} ({info['dtype']}, sm_{args.cc}): {info['registers']} registers, stack "
              f"{info['stack']} B ({info['spills']} spill loads/stores), shared {info['shared']} B, "
              f"{info['instructions']} instructions, {info['barriers']} barriers")
        for loop in info["loops"]:
            print(f"  loop {loop['start']:#07x}: {loop['instructions']:4d} instructions, "
                  f"{loop['barriers']:2d} barriers, {loop['shuffles']:3d} shuffles, "
                  f"{loop['spills']} spills  "
                  f"({', '.join(loop['origins'])})")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

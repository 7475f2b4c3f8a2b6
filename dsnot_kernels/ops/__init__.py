"""Fused Triton kernels of dsnot_kernels (backend ``"triton"``); importing this imports triton.

| file               | kernel          | what                                                      |
|--------------------|-----------------|-----------------------------------------------------------|
| refine_select.py   | select_kernel   | scores, initial mask, row error, top-T candidate queues   |
| refine_select_stream.py | select_stream_kernel | the same, programs looping over rows in chunks |
| refine_cycles.py   | cycles_kernel   | all swap cycles (unstructured and N:M), rows as lanes     |
| stats_kernel.py    | stats_kernel    | per-batch Σx, Σx², Σ_n M2_n of the activations (SPEC §1)   |
| refine.py          | (host)          | :func:`refine_triton`: two launches per problem           |
| launch_tuning.py   | (host)          | which select launch ``select="auto"`` takes on a GPU (timed) |
"""
from .refine import refine_triton
from .stats_kernel import batch_partial_sums

__all__ = ["refine_triton", "batch_partial_sums"]

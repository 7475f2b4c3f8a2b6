"""Test setup shared by every test file.

Triton's interpreter must be switched on before any ``@triton.jit`` decorator runs, i.e. before
``dsnot_kernels.ops`` is imported, so it is set here, at collection start, when no CUDA device
is present. GPU-marked tests are skipped without CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

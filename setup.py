"""Installs the library ``dsnot_kernels`` and the driver package ``dsnot_prune`` (from python/).

The optional compiled extension ``dsnot_kernels._C`` is built from csrc/ by
``build_extension.py`` (see README, "Building the extension"); the package works without it.
Install with ``pip install --no-build-isolation [-e] .`` so the extension compiles against the
torch already installed (with build isolation the build sees no torch and skips the extension).
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # build_extension.py beside this file

from build_extension import extension_setup_kwargs

setup(
    name="dsnot_kernels",
    version="0.1.0",
    description="Fast, exact DSnoT (Dynamic Sparse No Training) for pruned LLMs",
    python_requires=">=3.10",
    packages=["dsnot_kernels", "dsnot_kernels.ops", "dsnot_prune"],
    package_dir={"dsnot_prune": "python/dsnot_prune"},
    install_requires=["torch>=2.4"],
    extras_require={"driver": ["transformers>=4.57", "accelerate", "gguf", "safetensors", "tqdm"]},
    entry_points={"console_scripts": ["dsnot-prune=dsnot_prune.cli:main"]},
    **extension_setup_kwargs(),
)

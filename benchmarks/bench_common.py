"""Helpers shared by the benchmark scripts (they run as scripts: this folder is on sys.path)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine_name(device: str) -> str:
    """A folder-safe name for the results: the GPU's name, or ``cpu-<cores>core-<model>``."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}core-{model}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")

"""Helpers shared by the benchmark scripts (they run as scripts: this folder is on sys.path)."""
from __future__ import annotations

import csv
import json
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


def write_results_atomic(out_dir: Path, stem: str, summary: dict, csv_rows: list) -> None:
    """Write ``<stem>.json`` (``summary``) and ``<stem>.csv`` (``csv_rows``, dicts; their keys
    are the columns, list-valued ones left out) under ``out_dir``, each to a temporary name
    first and then renamed, so a reader (or a run killed by a time limit mid-write) never sees
    a half-written file. Scripts call it after every measurement: what was measured survives
    an interrupted run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / f"{stem}.json")
    if not csv_rows:
        return
    fields = [k for k in csv_rows[0] if not isinstance(csv_rows[0][k], (list, dict))]
    tmp = out_dir / f".{stem}.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows)
    tmp.replace(out_dir / f"{stem}.csv")


def print_summary(paths: list) -> None:
    """A short table of ``bench_refine`` JSON results (rows and LLaMA-7B set runs), for the end of
    a GPU session's output; files that are missing or unreadable are named, not fatal."""
    for path in map(Path, paths):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: no results ({type(exc).__name__})")
            continue
        state = "complete" if summary.get("complete") else "INCOMPLETE (stopped early)"
        print(f"{path}: {summary.get('machine')}, {state}")
        for r in summary.get("rows", []):
            print(f"  {r['shape']:>11} {r['pattern']:>12} {r['backend']:<40} {r['seconds'] * 1e3:9.3f} ms "
                  f"x{r['speedup_vs_reference']:7.1f} {r['fraction_of_copy_bw'] * 100:5.2f}% bw "
                  f"match={r['matches_reference']}")
        for r in summary.get("llama7b_set", []):
            print(f"  LLaMA-7B set {r['pattern']:>12} {r['backend']:<40} {r['seconds'] * 1e3:9.1f} ms")
        for entry in summary.get("triton_tuned_launches", []):
            print("  triton auto " + format_tuned(entry))


def format_tuned(entry: dict) -> str:
    """One line for a ``launch_tuning.tuned_launches()`` entry: the class, the winner, every
    candidate's time per run (fastest first, ms) and what was dropped."""
    times = ", ".join(f"{name} {sec * 1e3:.3f}" for name, sec in
                      sorted(entry["seconds"].items(), key=lambda kv: kv[1]))
    dropped = "".join(f"; dropped {name}: {why}" for name, why in entry["dropped"].items())
    return (f"{entry['rows']}x{entry['cols']} {entry['pattern']} {entry['dtype']} -> "
            f"{entry['launch']} ({times}){dropped}")

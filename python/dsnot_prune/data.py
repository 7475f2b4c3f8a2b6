"""Calibration and evaluation text: the packaged news corpus, local files, C4 / WikiText-2.

Sampling follows the original DSnoT/Wanda code (SPEC §6), with a private ``random.Random(seed)``
so the draws equal ``random.seed(seed); random.randint(...)``:

- *stream* sources (a text file, the news corpus, WikiText-2 train): the text is tokenized once
  and each sample is ``seqlen`` tokens from ``i = randint(0, ntokens - seqlen - 1)``;
- *documents* (C4): draw a document ``randint(0, ndocs - 1)`` until one is longer than
  ``seqlen`` tokens, then a window in it as above.

Evaluation (the WikiText-2 protocol): the text is tokenized once and cut into non-overlapping
windows of ``seqlen`` tokens; the remainder is dropped.

The default text is the 300 news articles of ``lee_background.cor`` from the ``gensim==4.4.0``
wheel (real, cased English; no package ships WikiText-2 or C4). It is fetched with
``pip download`` (no gensim install), read out of the wheel and cached. Articles
``[0, NEWS_SPLIT)`` are for calibration, ``[NEWS_SPLIT, 300)`` for evaluation (disjoint).
"""
from __future__ import annotations

import glob
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from .models import DriverError, cache_dir

NEWS_WHEEL = "gensim==4.4.0"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
NEWS_FILE = "lee_background.cor"
NEWS_SPLIT = 150          # articles [0, 150) calibrate, [150, 300) evaluate
DATASETS = ("news", "wikitext2", "c4")


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def _pip_download(dest: str) -> subprocess.CompletedProcess:
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "-q", "-d", dest]
    done = subprocess.run(base + [NEWS_WHEEL], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        # No wheel for this interpreter/platform: the file is the same in every wheel, so ask for
        # one fixed platform's wheel explicitly.
        done = subprocess.run(base + ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                                      "--implementation", "cp", "--abi", "cp311", NEWS_WHEEL],
                              capture_output=True, text=True, timeout=900)
    return done


def news_path(log=print) -> Path:
    """Path of the cached news corpus, fetching it once (atomic: temp file, then rename)."""
    target = cache_dir() / "text" / NEWS_FILE
    if target.is_file():
        return target
    log = log or (lambda msg: None)
    log(f"fetching the news corpus ({NEWS_MEMBER} from the {NEWS_WHEEL} wheel) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsnot-gensim-") as tmp:
        try:
            done = _pip_download(tmp)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DriverError(f"could not run pip to fetch the news corpus: {exc}; "
                              f"pass --calib-text/--eval-text FILE instead") from exc
        wheels = glob.glob(os.path.join(tmp, "gensim-*.whl"))
        if done.returncode != 0 or not wheels:
            raise DriverError(f"could not fetch the news corpus (pip download {NEWS_WHEEL} failed: "
                              f"{(done.stderr or done.stdout).strip()[-500:]}); pass --calib-text/--eval-text FILE "
                              f"instead, or put the text at {target}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(NEWS_MEMBER)
        fd, part = tempfile.mkstemp(prefix=f".{NEWS_FILE}.", dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(part, target)
    return target


def news_articles(log=print) -> List[str]:
    """The 300 articles of the news corpus (one per line)."""
    lines = [ln.strip() for ln in news_path(log).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def read_text_file(path: str, what: str) -> str:
    """Read a UTF-8 text file; a clear error naming the option if it cannot be used."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DriverError(f"{what} {path!r}: no such file") from exc
    except IsADirectoryError as exc:
        raise DriverError(f"{what} {path!r} is a directory, not a text file") from exc
    except UnicodeDecodeError as exc:
        raise DriverError(f"{what} {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DriverError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if not text.strip():
        raise DriverError(f"{what} {path!r} is empty")
    return text


def _split_lines(text: str) -> tuple[str, str]:
    """First half / second half of a text's lines (for one file used for both purposes)."""
    lines = text.splitlines()
    if len(lines) < 2:
        half = len(text) // 2
        return text[:half], text[half:]
    half = len(lines) // 2
    return "\n".join(lines[:half]), "\n".join(lines[half:])


def _require_datasets(name: str) -> None:
    """Raise a DriverError for ``--dataset name`` when the ``datasets`` package cannot be imported."""
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise DriverError(f"--dataset {name} needs the 'datasets' package (pip install datasets) and access to "
                          f"the Hugging Face hub or its local cache; the default --dataset news needs neither") from exc


def _datasets_text(name: str, split: str):
    """WikiText-2 / C4 through the ``datasets`` package; clear error when it cannot be had."""
    _require_datasets(name)
    from datasets import load_dataset
    try:
        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return data["text"]
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        data = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return data
    except Exception as exc:  # noqa: BLE001 - any failure means the data cannot be had here
        raise DriverError(f"--dataset {name}: could not load the {split} split ({type(exc).__name__}: {exc}); "
                          f"it needs the Hugging Face hub or a local datasets cache") from exc


@dataclass
class TextPlan:
    """Where calibration and evaluation text come from (after resolving the options)."""

    calib: str            # "news" | "wikitext2" | "c4" | "file:<path>"
    eval: str

    def describe(self) -> dict:
        return {"calibration": self.calib, "evaluation": self.eval}


def plan_text(dataset: str, calib_text: Optional[str], eval_text: Optional[str]) -> TextPlan:
    if dataset not in DATASETS:
        raise DriverError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
    if calib_text and eval_text and _same_file(calib_text, eval_text):
        eval_text = calib_text       # one file however spelled: split in halves (_source_texts)
    calib = f"file:{calib_text}" if calib_text else dataset
    evals = f"file:{eval_text}" if eval_text else dataset
    return TextPlan(calib, evals)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:                  # a missing file: check_text_files names it
        return os.path.realpath(a) == os.path.realpath(b)


def check_text_files(plan: TextPlan, evaluate: bool = True) -> None:
    """Fail early (before loading a model) on an unreadable --calib-text/--eval-text, or on
    --dataset wikitext2/c4 without the ``datasets`` package (the evaluation text only if
    ``evaluate``)."""
    specs = [(plan.calib, "--calib-text")] + ([(plan.eval, "--eval-text")] if evaluate else [])
    for spec, what in specs:
        if spec.startswith("file:"):
            read_text_file(spec[5:], what)
        elif spec in ("wikitext2", "c4"):
            _require_datasets(spec)


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids.to(torch.long)


def _stream_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    if ids.numel() <= seqlen + 1:
        raise DriverError(f"{what} has {ids.numel()} tokens: too short for --seqlen {seqlen}")
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, ids.numel() - seqlen - 1)
        rows.append(ids[i:i + seqlen])
    return torch.stack(rows)


def _document_samples(docs, tokenizer, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        for _attempt in range(10000):
            enc = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            if enc.numel() > seqlen:
                break
        else:
            raise DriverError(f"{what}: found no document longer than --seqlen {seqlen} tokens")
        i = rng.randint(0, enc.numel() - seqlen - 1)
        rows.append(enc[i:i + seqlen])
    return torch.stack(rows)


def _source_texts(spec: str, plan: TextPlan, purpose: str, log) -> str:
    """The raw text of ``spec`` for ``purpose`` ("calib" or "eval"), disjoint when shared."""
    same = plan.calib == plan.eval
    if spec == "news":
        articles = news_articles(log)
        part = articles[:NEWS_SPLIT] if purpose == "calib" else articles[NEWS_SPLIT:]
        return "\n\n".join(part)
    if spec.startswith("file:"):
        text = read_text_file(spec[5:], "--calib-text" if purpose == "calib" else "--eval-text")
        if same:    # one file for both: first half calibrates, second half evaluates
            text = _split_lines(text)[0 if purpose == "calib" else 1]
        return text
    if spec == "wikitext2":   # original: " ".join(train) for calibration, "\n\n".join(test) for eval
        return " ".join(_datasets_text(spec, "train")) if purpose == "calib" else \
            "\n\n".join(_datasets_text(spec, "test"))
    raise DriverError(f"unknown text source {spec!r}")


def calibration_tokens(plan: TextPlan, tokenizer, nsamples: int, seqlen: int, seed: int,
                       log=print) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 calibration samples (SPEC §6 sampling, seeded)."""
    if nsamples <= 0 or seqlen <= 1:
        raise DriverError(f"--nsamples must be >= 1 and --seqlen >= 2, got {nsamples}, {seqlen}")
    if plan.calib == "c4":
        return _document_samples(_datasets_text("c4", "train"), tokenizer, nsamples, seqlen, seed, "c4 train")
    text = _source_texts(plan.calib, plan, "calib", log)
    return _stream_samples(_encode(tokenizer, text), nsamples, seqlen, seed, f"calibration text ({plan.calib})")


def evaluation_windows(plan: TextPlan, tokenizer, seqlen: int, max_windows: Optional[int] = None,
                       log=print) -> torch.Tensor:
    """``[windows, seqlen]`` non-overlapping evaluation windows (remainder dropped)."""
    if plan.eval == "c4":   # original: 1100 validation documents joined, first 256 windows
        text = " ".join(_datasets_text("c4", "validation")[:1100]["text"])
        ids = _encode(tokenizer, text)[: 256 * seqlen]
    else:
        ids = _encode(tokenizer, _source_texts(plan.eval, plan, "eval", log))
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, int(max_windows))
    if count == 0:
        raise DriverError(f"evaluation text ({plan.eval}) has {ids.numel()} tokens: "
                          f"not one window of --seqlen {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)

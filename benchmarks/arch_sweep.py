"""Which transformers causal-LM architectures the driver prunes, checked on tiny random models.

For every architecture in the installed transformers' causal-LM mapping (or those named with
``--only``), a child process builds a tiny random model of it (every size in the default
config shrunk: ``SMALL``), runs the driver on it (50% unstructured, DSnoT, the ``torch``
backend, the driver tests' small corpus and byte-level BPE tokenizer from ``tests/helpers.py``)
and compares the dense and pruned perplexities the driver measured layer by layer with plain
whole-model forward passes on the same windows. Each architecture ends as one of:

- ``ok``: both perplexities equal the whole model's (relative 1e-4);
- ``mismatch``: they differ: the layer-by-layer run does not compute the model (a bug);
- ``refused``: the driver said why it cannot prune it (a ``DriverError``);
- ``driver error``: the driver raised anything else (a bug);
- ``not built``: the shrunk config, the model or its whole-model forward failed before the
  driver ran (says nothing about the driver: ``SMALL`` does not fit that architecture);
- ``timeout`` / ``crashed``: the child exceeded ``--timeout`` or ``--mem-gb``, or died.

The results go to ``results/<machine>/arch_sweep-transformers-<version>.{json,csv}``, written
after every architecture. Exit status 1 if any architecture ended ``mismatch`` or ``driver
error``. About 5-10 s per architecture on a 2-core CPU (~25 min for transformers 5.24's 196).

    python benchmarks/arch_sweep.py [--only llama,xlm] [--timeout 180] [--mem-gb 8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))    # the driver tests' tiny text and tokenizer

from helpers import VOCAB, train_tokenizer, whole_model_ppl, write_corpus  # noqa: E402

# Every size a default config may carry, shrunk (set only where the config has the attribute).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
             n_embd=64, n_layer=2, n_head=4, d_model=64, ffn_dim=128, n_positions=512, num_layers=2,
             num_heads=4, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
             num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=8, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
             n_group=1, topk_group=1, decoder_sparse_step=1, first_k_dense_replace=1, word_embed_proj_dim=64,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
CSV_COLUMNS = ("status", "seconds", "ppl_driver", "ppl_whole", "pruned_share", "why")
STATUSES = ("ok", "mismatch", "refused", "driver error", "not built", "timeout", "crashed")


def tiny_config(model_type: str):
    """The default config of ``model_type`` with the sizes of ``SMALL`` (text config where nested)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config = CONFIG_MAPPING[model_type]()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in SMALL.items():
        if hasattr(text, key) and not isinstance(getattr(text, key), (list, dict)):
            try:
                setattr(text, key, value)
            except Exception:  # noqa: BLE001  (read-only properties of some configs)
                pass
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        try:
            text.layer_types = (layer_types * 8)[:getattr(text, "num_hidden_layers", len(layer_types))]
        except Exception:  # noqa: BLE001
            pass
    return config


def child(model_type: str, corpus: str, tokenizer_dir: str, mem_gb: float) -> dict:
    """One architecture, in this (child) process: a result dict with ``status``."""
    resource.setrlimit(resource.RLIMIT_AS, (int(mem_gb * 2**30),) * 2)
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from dsnot_prune import data as data_mod
    from dsnot_prune.models import DriverError
    from dsnot_prune.pipeline import PruneArgs, run
    transformers.logging.set_verbosity_error()
    args = PruneArgs(model=model_type, sparsity=0.5, calib_text=corpus, eval_text=corpus, nsamples=6, seqlen=32,
                     batch_size=4, eval_windows=4, eval_dense=True, device="cpu", backend="torch",
                     progress=False, quiet=True)
    try:
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
        plan = data_mod.plan_text("news", corpus, corpus)
        windows = data_mod.evaluation_windows(plan, tokenizer, args.seqlen, args.eval_windows, lambda msg: None)
        dense = whole_model_ppl(model, windows, args.batch_size)
    except Exception as exc:  # noqa: BLE001
        return {"status": "not built", "why": f"{type(exc).__name__}: {exc}"[:400]}
    try:
        report = run(args, model=model, tokenizer=tokenizer)
    except DriverError as exc:
        return {"status": "refused", "why": str(exc)[:400]}
    except Exception as exc:  # noqa: BLE001
        return {"status": "driver error", "why": f"{type(exc).__name__}: {exc}"[:400]}
    pruned = whole_model_ppl(model, windows, args.batch_size)
    same = (math.isclose(report["ppl_dense"], dense, rel_tol=1e-4) and math.isclose(report["ppl"], pruned, rel_tol=1e-4))
    return {"status": "ok" if same else "mismatch", "ppl_dense_driver": report["ppl_dense"],
            "ppl_dense_whole": dense, "ppl_driver": report["ppl"], "ppl_whole": pruned,
            "sparsity": report["sparsity"], "pruned_share": report["pruned_share_of_decoder_weights"],
            "left_dense": report["left_dense"]}


def run_one(model_type: str, corpus: str, tokenizer_dir: str, timeout: float, mem_gb: float) -> dict:
    """``child`` in a fresh process (an architecture's import side effects or memory stay there)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_type, "--corpus", corpus,
           "--tokenizer-dir", tokenizer_dir, "--mem-gb", str(mem_gb)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"more than {timeout:g} s", "seconds": timeout}
    seconds = round(time.perf_counter() - start, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "crashed", "why": f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}",
                "seconds": seconds}
    return {**json.loads(lines[-1]), "seconds": seconds}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated model types (default: every causal LM)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture (default 180)")
    parser.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit per architecture (default 8)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.mem_gb <= 0:
        parser.error(f"--timeout and --mem-gb must be > 0, got {args.timeout:g} and {args.mem_gb:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.tokenizer_dir, args.mem_gb)), flush=True)
        return 0
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from bench_common import machine_name, write_results_atomic
    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    wanted = known if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown or not wanted:
        print(f"--only: {', '.join(unknown) or 'nothing named'}: not a causal-LM model type of transformers "
              f"{transformers.__version__} (e.g. {', '.join(known[:5])}, ...)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else HERE / "results" / machine_name("cpu")
    stem = f"arch_sweep-transformers-{transformers.__version__}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.txt")
        tokenizer_dir = str(Path(tmp) / "tokenizer")
        train_tokenizer(corpus).save_pretrained(tokenizer_dir)
        for i, model_type in enumerate(wanted, 1):
            result = run_one(model_type, corpus, tokenizer_dir, args.timeout, args.mem_gb)
            results[model_type] = result
            print(f"[{i}/{len(wanted)}] {model_type:28s} {result['status']:12s} {result.get('why', '')[:150]}",
                  flush=True)
            counts = {status: sum(r["status"] == status for r in results.values()) for status in STATUSES}
            summary = {"transformers": transformers.__version__, "complete": i == len(wanted),
                       "counts": counts, "architectures": results}
            rows = [{"model_type": name, **{key: r.get(key, "") for key in CSV_COLUMNS}} for name, r in results.items()]
            write_results_atomic(out, stem, summary, rows)
    print("  ".join(f"{status}: {n}" for status, n in counts.items() if n))
    print(f"results: {out / stem}.json")
    return 1 if counts["mismatch"] or counts["driver error"] else 0


if __name__ == "__main__":
    sys.exit(main())

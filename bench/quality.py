"""Quality benchmark (not a test): perplexity of SmolLM2-135M compressed by each method, vs its dense self.

Protocol: calibration 32 x 512 tokens of wiki_calib.txt (seed 0; plain text: `--chat-fraction 0` unless
given), perplexity on the first 64 non-overlapping 512-token windows of wiki_eval.txt; out of domain, the
first `--ood-windows` 512-token windows of the last 400,000 characters of ../shared/data/austen.txt
(public-domain Austen), so overfitting to the calibration domain shows; with `--tasks`, zero-shot accuracy
(lm-eval, on the in-memory model) beside them.
Assets from ../shared/assets/prepare.py.

    python bench/quality.py [--rows svd,svd-llm] [--ratios 0.2,0.4] [--threads 1] [--tasks austen_mc]
                            [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rankwise.calib.data import load_text, tokenize
from rankwise.compress.config import CompressConfig
from rankwise.compress.job import compress_in_memory
from rankwise.compress.peak_memory import peak_memory
from rankwise.compress.loading import load_model
from rankwise.eval.ppl import perplexity

ASSETS = Path(os.environ.get("RANKWISE_ASSETS", Path.home() / ".cache" / "rankwise-assets"))
AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"
OOD_CHARS = 400_000

# kl-refine's former defaults: the calibration windows alone, 4 epochs of 2 windows, judged once an epoch
FORMER_KL_REFINE = {"sampled_windows": 0, "evals_per_epoch": 1, "epochs": 4}

# name -> CompressConfig options (beyond model / ratio / calibration). Add a row by adding a line.
ROWS = {
    "svd": {"method": "svd"},
    "asvd": {"method": "asvd"},
    "svd-llm": {"method": "svd-llm"},
    # allocation, Fisher weighting, compensation (inside the ratio), closed-form refit, combinations
    "svd-llm+welore": {"method": "svd-llm", "ranks": "welore"},
    "fwsvd": {"method": "fwsvd"},
    "svd-llm+eora32": {"method": "svd-llm", "compensate": "eora", "eora_rank": 32},
    "svd-llm+refit": {"method": "svd-llm", "refit": True},
    "svd-llm+refit+welore": {"method": "svd-llm", "refit": True, "ranks": "welore"},
    "svd-llm+refit+welore+eora32": {"method": "svd-llm", "refit": True, "ranks": "welore", "compensate": "eora",
                                    "eora_rank": 32},
    "svd-llm+refit-d0.1": {"method": "svd-llm", "refit": True, "refit_damp": 0.1},
    "svd-llm+refit-d1": {"method": "svd-llm", "refit": True, "refit_damp": 1.0},
    "svd-llm+refit-d10": {"method": "svd-llm", "refit": True, "refit_damp": 10.0},
    "svd-llm+refit+eora32": {"method": "svd-llm", "refit": True, "compensate": "eora", "eora_rank": 32},
    # allocation from the whitened truncation loss, block refinement, and their combinations
    "svd-llm+loss-aware": {"method": "svd-llm", "ranks": "loss-aware"},
    "svd-llm+refit+loss-aware": {"method": "svd-llm", "refit": True, "ranks": "loss-aware"},
    "svd-llm+refit+refine": {"method": "svd-llm", "refit": True, "refine": True},
    "svd-llm+refit+eora32+refine": {"method": "svd-llm", "refit": True, "compensate": "eora", "eora_rank": 32,
                                    "refine": True},
    "svd-llm+loss-aware+refine": {"method": "svd-llm", "ranks": "loss-aware", "refine": True},
    "svd-llm+loss-aware+refit+eora32": {"method": "svd-llm", "ranks": "loss-aware", "refit": True,
                                        "compensate": "eora", "eora_rank": 32},
    "svd-llm+loss-aware+refit+eora32+refine": {"method": "svd-llm", "ranks": "loss-aware", "refit": True,
                                               "compensate": "eora", "eora_rank": 32, "refine": True},
    # block refinement's peak learning rate, and a held-out quarter of the batches stopping and judging it
    "svd-llm+loss-aware+refine-lr1e-3": {"method": "svd-llm", "ranks": "loss-aware", "refine": True,
                                         "refine_lr": 1e-3},
    "svd-llm+loss-aware+refine-holdout": {"recipe": [
        {"stage": "svd-llm"}, {"stage": "loss-aware"},
        {"stage": "block-refine", "options": {"lr": 1e-3, "steps": 96, "epochs": 16, "holdout": 0.25,
                                              "patience": 3, "warmup": 0.05, "clip": 1.0}}]},
    # end-to-end distillation against the dense model's top-k next-token distribution, instead of block refinement
    "svd-llm+loss-aware+kl-refine": {"recipe": [{"stage": "svd-llm"}, {"stage": "loss-aware"},
                                                {"stage": "kl-refine"}]},
    "svd-llm+loss-aware+kl-refine-real-4x2": {"recipe": [{"stage": "svd-llm"}, {"stage": "loss-aware"},
                                                         {"stage": "kl-refine", "options": {**FORMER_KL_REFINE}}]},
    "svd-llm+loss-aware+kl-refine-8x1": {"recipe": [{"stage": "svd-llm"}, {"stage": "loss-aware"}, {
        "stage": "kl-refine", "options": {**FORMER_KL_REFINE, "epochs": 8, "batch": 1}}]},
    # loss-aware ranks priced by a 256-row sketch of the whole output Fisher matrix instead of its diagonal
    "svd-llm+loss-aware-sketch256": {"method": "svd-llm", "ranks": "loss-aware", "fisher_sketch": 256},
    "svd-llm+loss-aware-sketch256+kl-refine-8x1": {"recipe": [
        {"stage": "output-fisher", "options": {"sketch": 256}}, {"stage": "svd-llm"}, {"stage": "loss-aware"},
        {"stage": "kl-refine", "options": {**FORMER_KL_REFINE, "epochs": 8, "batch": 1}}]},
    "preset-best": {"preset": "best"},
    "preset-fast": {"preset": "fast"},  # = svd-llm+loss-aware+refine (block refinement at its default lr 1e-3)
}


def scalar_records(meta) -> dict:
    """Each stage's record without its per-layer / per-block tables (e.g. kl-refine's epochs and held-out KL)."""
    return {run.stage: {k: v for k, v in run.record.items() if not isinstance(v, (dict, list))}
            for run in meta.recipe if run.record}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "smollm2-135m"))
    ap.add_argument("--calib", default=f"text:{ASSETS / 'text' / 'wiki_calib.txt'}")
    ap.add_argument("--eval", default=f"text:{ASSETS / 'text' / 'wiki_eval.txt'}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--chat-fraction", type=float, default=0.0,
                    help="share of chat-templated calibration windows (the protocol: 0, plain wiki text)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ood", type=Path, default=AUSTEN, help="out-of-domain text (its last 400,000 characters)")
    ap.add_argument("--ood-windows", type=int, default=64, help="0: no out-of-domain column")
    ap.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (e.g. austen_mc); accuracy columns")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    model, tokenizer, _ = load_model(args.model, "auto", args.device)
    device = next(model.parameters()).device
    ids = tokenize(tokenizer, load_text(args.eval, "test"))
    ood_ids = None
    if args.ood_windows:
        ood_ids = tokenize(tokenizer, args.ood.read_text(encoding="utf-8")[-OOD_CHARS:])

    def ppl_of(m) -> float:
        return perplexity(m, ids, args.seqlen, device, max_windows=args.windows).ppl

    def ood_of(m) -> float | None:
        if ood_ids is None:
            return None
        return perplexity(m, ood_ids, args.seqlen, device, max_windows=args.ood_windows).ppl

    tasks = [t for t in args.tasks.split(",") if t]

    def accuracy_of(m) -> dict:
        if not tasks:
            return {}
        from rankwise.eval.zeroshot import run_tasks
        return {t: task.metrics["acc"] for t, task in run_tasks(m, tokenizer, tasks, seed=0).metrics.items()}

    dense, dense_ood, dense_acc = ppl_of(model), ood_of(model), accuracy_of(model)
    del model
    results = [{"row": "dense", "ratio": 0.0, "ppl": dense, "rel": 1.0, "ood_ppl": dense_ood, "ood_rel": 1.0,
                "acc": dense_acc, "achieved": 0.0, "seconds": 0.0}]
    print(f"dense ppl {dense:.3f}, out of domain {dense_ood}  (threads {torch.get_num_threads()}, device {device})",
          flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for row in rows:
            options = {"chat_fraction": args.chat_fraction, **ROWS[row]}
            cfg = CompressConfig(model=args.model, ratio=ratio, calib=args.calib, nsamples=args.nsamples,
                                 seqlen=args.seqlen, device=args.device, **options)
            t0 = time.perf_counter()
            m, _, meta = compress_in_memory(cfg, torch.device(device))
            seconds = time.perf_counter() - t0
            m.to(device)
            p, ood, acc = ppl_of(m), ood_of(m), accuracy_of(m)
            peak = peak_memory(torch.device(device))
            res = {"row": row, "ratio": ratio, "ppl": p, "rel": p / dense, "ood_ppl": ood,
                   "ood_rel": ood / dense_ood if ood is not None else None, "acc": acc,
                   "achieved": meta.ratio_achieved,
                   "achieved_without_compensation": meta.ratio_achieved_without_compensation,
                   "seconds": round(seconds, 1), "host_peak_gib": peak.host_gib, "gpu_peak_gib": peak.gpu_gib,
                   "stage_seconds": meta.stage_seconds, "records": scalar_records(meta)}
            results.append(res)
            print(f"{row:>24} ratio {ratio:.2f}: ppl {p:12.3f} ({p / dense:8.2f}x dense), ood {ood}, acc {acc}, "
                  f"achieved {meta.ratio_achieved:.4f}, {seconds:.0f} s", flush=True)
            del m

    print()
    task_head = "".join(f" {t} acc | of dense |" for t in tasks)
    print("| pipeline | ratio asked | ratio achieved (w/o compensation) | ppl | ppl / dense | Austen ppl "
          f"| Austen / dense |{task_head} time (s) | peak host GiB | peak GPU GiB |")
    print("|---" * (10 + 2 * len(tasks)) + "|")
    for r in results:
        ood = f"{r['ood_ppl']:.3f} | {r['ood_rel']:.2f}" if r.get("ood_ppl") is not None else "- | -"
        acc = "".join(f" {r['acc'][t]:.4f} | {r['acc'][t] / dense_acc[t]:.1%} |" for t in tasks)
        print(f"| {r['row']} | {r['ratio']:.2f} | {r['achieved']:.4f} ({r.get('achieved_without_compensation', 0):.4f})"
              f" | {r['ppl']:.3f} | {r['rel']:.2f} | {ood} |{acc} {r['seconds']} | {r.get('host_peak_gib', '')} "
              f"| {r.get('gpu_peak_gib', '')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

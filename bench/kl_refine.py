"""kl-refine's options tried on one saved checkpoint (not a test): the dense model's sparse teacher on the
calibration windows, then the `kl-refine` stage with the given options on the checkpoint's factors, then
perplexity on wiki_eval and out of domain (Austen), against the dense model in the same run.

The checkpoint is the closed form's (e.g. `compress model M --method svd-llm --ranks loss-aware ...` without
refinement); with the same calibration settings as the checkpoint's, this is the computation that the
pipeline runs after the block walk, so the passes and the walk are paid once for any number of tries.

    python bench/kl_refine.py CKPT '{"epochs": 8, "batch": 1}' [--nsamples 32] [--tasks austen_mc] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from rankwise.calib.chat import mixed_calibration_set
from rankwise.calib.data import load_text, tokenize
from rankwise.compress.loading import load_model
from rankwise.compress.stages.refine_kl import KLRefine, KLRefineOptions
from rankwise.eval.ppl import perplexity

ASSETS = Path(os.environ.get("RANKWISE_ASSETS", Path.home() / ".cache" / "rankwise-assets"))
AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a Rankwise checkpoint of the same model, without kl-refine")
    ap.add_argument("options", help="kl-refine's options as JSON (e.g. '{\"lr\": 1e-4}')")
    ap.add_argument("--model", default=str(ASSETS / "smollm2-135m"), help="the dense model (the teacher)")
    ap.add_argument("--calib", default=f"text:{ASSETS / 'text' / 'wiki_calib.txt'}")
    ap.add_argument("--eval", default=f"text:{ASSETS / 'text' / 'wiki_eval.txt'}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (e.g. austen_mc)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    stage = KLRefine(KLRefineOptions(**json.loads(args.options)))
    dense, tokenizer, _ = load_model(args.model, "auto", "cpu")
    calib = mixed_calibration_set(tokenizer, args.calib, args.nsamples, args.seqlen, 0, chat_fraction=0.0,
                                  text=load_text(args.calib, "train"))
    job = SimpleNamespace(model=dense, calib_ids=calib.input_ids, device=cpu, storage=cpu,
                          progress=lambda stage, i, n: print(f"{stage} {i}/{n}", flush=True))
    stage.before_walk(job)   # the teacher, from the dense model
    texts = (tokenize(tokenizer, load_text(args.eval, "test")),
             tokenize(tokenizer, AUSTEN.read_text(encoding="utf-8")[-400_000:]))
    scores = {"dense": evaluate(dense, tokenizer, texts, args)}
    del dense
    job.model, _, _ = load_model(args.checkpoint, "auto", "cpu")
    scores["checkpoint"] = evaluate(job.model, tokenizer, texts, args)
    t0 = time.perf_counter()
    stage.correct_model(job)
    seconds = time.perf_counter() - t0
    scores["kl-refine"] = evaluate(job.model, tokenizer, texts, args)
    print("\n| model | wiki ppl | x dense | Austen ppl | x dense |" + "".join(f" {t} |" for t in scores["dense"][2])
          + "\n|---|---|---|---|---|" + "---|" * len(scores["dense"][2]))
    base = scores["dense"]
    for name, (ppl, ood, acc) in scores.items():
        print(f"| {name} | {ppl:.2f} | {ppl / base[0]:.3f} | {ood:.2f} | {ood / base[1]:.3f} |"
              + "".join(f" {a:.3f} |" for a in acc.values()))
    record = stage.record.model_dump()
    print(f"\nkl-refine {args.options}: {seconds:.0f} s, {json.dumps(record)}")
    if args.json:
        args.json.write_text(json.dumps({"options": json.loads(args.options), "scores": scores, "record": record,
                                         "seconds": round(seconds, 1)}, indent=1) + "\n")


def evaluate(model, tokenizer, texts, args) -> tuple[float, float, dict]:
    """(wiki_eval perplexity, Austen perplexity, zero-shot accuracies); texts: the two token streams."""
    model.eval()
    ids, ood = texts
    ppl = perplexity(model, ids, args.seqlen, "cpu", max_windows=args.windows).ppl
    ood_ppl = perplexity(model, ood, args.seqlen, "cpu", max_windows=args.windows).ppl
    acc = {}
    if args.tasks:
        from rankwise.eval.zeroshot import run_tasks
        acc = {t: r.metrics["acc"] for t, r in run_tasks(model, tokenizer, args.tasks.split(","), seed=0).metrics.items()}
    return ppl, ood_ppl, acc


if __name__ == "__main__":
    main()

"""Dense models and Rankwise checkpoints served offline by vLLM's Transformers backend: load time, resident
memory, prefill and decode tokens/s, and whether a checkpoint's greedy tokens are the ones transformers gives.

    python bench/serve_vllm.py DENSE CKPT [CKPT ...] [--threads 2] [--prompt-len 128] [--prompts 32]
        [--batch-sizes 1,16] [--new-tokens 128] [--reps 3] [--kv-cache-gib 1] [--check-tokens 32]

Needs vLLM (`pip install -e ".[serve]"` on a CPU machine, `pip install vllm` on a GPU one). Every model (a
dense one or a Rankwise checkpoint, with its remote code) is built as
`vllm.LLM(MODEL, model_impl="transformers", trust_remote_code=..., enforce_eager=True, dtype=--dtype)`, each
in its own process, one after another, so that neither memory nor threads mix between models:

- load s: from LLM(...) to ready, engine start included.
- memory MiB: resident memory of the model's processes after loading (vLLM runs an engine core and a worker
  beside the calling process): their proportional set sizes summed, so pages they share count once. The KV
  cache is --kv-cache-gib for every model (vLLM allocates it at start), inside that figure.
- prefill tok/s: --prompts prompts of --prompt-len random tokens submitted together, one new token each:
  prompt tokens / wall seconds.
- decode tok/s at batch b: b such prompts generating --new-tokens greedy tokens, minus the same prompts
  generating one token (the prefill): b (new_tokens - 1) / (t_new_tokens - t_1).
- greedy tokens: with --check-tokens N, N greedy tokens from each of a few prompts in vLLM and in
  transformers (`from_pretrained`, same checkpoint and dtype): how many prompts give identical tokens.

Every timed figure is the median of --reps runs after a warm-up run. Prefix caching is off (the same prompts
run again must be computed again). --threads N binds vLLM's worker to cores 0..N-1 (vLLM's default on a
CPU reserves one core for the engine and binds the worker to the others). Prints one markdown table;
--json FILE also writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The river flows through the valley and",
    "She opened the letter and read",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="folders: dense models and Rankwise checkpoints, in table order")
    ap.add_argument("--threads", type=int, default=None, help="bind vLLM's worker to cores 0..N-1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32, help="prompts of the prefill run")
    ap.add_argument("--batch-sizes", default="1,16", help="decode batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens of a decode run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with transformers "
                    "(0: no comparison)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: prompt-len + new-tokens (or check-tokens) + 64 (the check's prompts)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every figure to this JSON file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this model here, JSON to --out
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.models and not args.one:
        ap.error("give at least one model folder")
    if args.max_model_len is None:
        args.max_model_len = args.prompt_len + max(args.new_tokens, args.check_tokens, 1) + 64
    return args


def _batches(args) -> list[int]:
    return [int(b) for b in args.batch_sizes.split(",") if b.strip()]


def model_config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def factor_label(config: dict, dtype: str) -> str:
    """dense, or how a checkpoint's factors are stored (`dtype`, the serving one, unless its modules say
    otherwise)."""
    modules = (config.get("rankwise") or {}).get("modules")
    if not modules:
        return "dense"
    stored = sorted({m.get("factor_dtype") or dtype for m in modules.values() if m.get("rank") is not None})
    return ", ".join(stored) or dtype


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=gen).tolist()


def check_prompts(path: str, vocab: int, seed: int) -> list[list[int]]:
    """PROMPTS through the model's tokenizer, else a few random ones."""
    try:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(path)
        return [tok(p)["input_ids"] for p in PROMPTS]
    except (OSError, ValueError):
        return random_prompts(vocab, len(PROMPTS), 12, seed + 7)


def transformers_tokens(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> list[list[int]]:
    import torch
    import transformers
    remote = "auto_map" in model_config(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote,
                                                              dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always new_tokens tokens
    out = []
    with torch.no_grad():
        for ids in prompts:
            new = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids):]
            out.append(new.tolist())
    return out


def tree_memory_mib() -> dict:
    """Resident memory of this process and its children (vLLM's engine core and worker), in MiB: PSS summed
    (shared pages split between the processes that map them) and the largest single RSS."""
    import psutil
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    pss, rss = 0, 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss = max(rss, info.rss)
    return {"pss_mib": pss / 2**20, "largest_rss_mib": rss / 2**20, "processes": len(procs)}


def _timed(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def _median(fn, reps: int) -> float:
    return statistics.median(fn() for _ in range(reps))


def measure_one(path: str, args) -> dict:
    """Everything the table shows for one model, measured in this process."""
    from vllm import LLM, SamplingParams
    config = model_config(path)
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    start = time.perf_counter()
    llm = LLM(path, model_impl="transformers", trust_remote_code="auto_map" in config, dtype=args.dtype,
              enforce_eager=True, max_model_len=args.max_model_len, skip_tokenizer_init=True,
              enable_prefix_caching=False, seed=args.seed,
              # on a CPU, gpu_memory_utilization is a share of host memory; the KV cache is set explicitly
              gpu_memory_utilization=0.15, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30))
    row = {"model": path, "factors": factor_label(config, args.dtype), "load_s": time.perf_counter() - start,
           "memory": tree_memory_mib()}
    prompts = random_prompts(vocab, args.prompts, args.prompt_len, args.seed)
    _timed(llm, prompts[:2], 2)  # warm-up
    row["prefill_tok_s"] = args.prompts * args.prompt_len / _median(lambda: _timed(llm, prompts, 1), args.reps)
    row["decode_tok_s"] = {}
    for b in _batches(args):
        batch = random_prompts(vocab, b, args.prompt_len, args.seed + b)
        first = _median(lambda: _timed(llm, batch, 1), args.reps)
        full = _median(lambda: _timed(llm, batch, args.new_tokens), args.reps)
        # None: the decode steps took no measurable time beyond the noise of the one-token run
        row["decode_tok_s"][str(b)] = b * (args.new_tokens - 1) / (full - first) if full > first else None
    if args.check_tokens:
        ids = check_prompts(path, vocab, args.seed)
        outs = llm.generate([{"prompt_token_ids": p} for p in ids],
                            SamplingParams(max_tokens=args.check_tokens, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        served = [list(o.outputs[0].token_ids) for o in outs]
        expected = transformers_tokens(path, ids, args.check_tokens, args.dtype)
        row["tokens_identical"] = sum(a == b for a, b in zip(served, expected))
        row["tokens_prompts"] = len(ids)
    return row


def run_isolated(path: str, argv: list[str], args) -> dict:
    """measure_one in a fresh process (its own vLLM engine), its figures read back from a JSON file."""
    env = dict(os.environ)
    if args.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        # vLLM's log goes to stderr: stdout is the table alone
        res = subprocess.run([sys.executable, __file__, *argv, "--one", path, "--out", str(out)], env=env,
                             stdout=sys.stderr)
        if res.returncode != 0 or not out.is_file():
            return {"model": path, "factors": factor_label(model_config(path), args.dtype),
                    "error": f"exit {res.returncode}"}
        return json.loads(out.read_text())


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(rows: list[dict], args) -> str:
    batches = _batches(args)
    head = (["model", "factors", "load s", "memory MiB", "prefill tok/s"] + [f"decode tok/s b{b}" for b in batches]
            + (["greedy tokens = transformers"] if args.check_tokens else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['factors']} | " + " | ".join(["failed: " + r["error"]]
                                                                           + [""] * (len(head) - 3)) + " |")
            continue
        cells = [Path(r["model"]).name, r["factors"], f"{r['load_s']:.1f}", f"{r['memory']['pss_mib']:.0f}",
                 f"{r['prefill_tok_s']:.1f}"] + [_figure(r["decode_tok_s"][str(b)]) for b in batches]
        if args.check_tokens:
            cells.append(f"{r['tokens_identical']}/{r['tokens_prompts']} prompts")
        lines.append("| " + " | ".join(cells) + " |")
    threads = f"worker bound to cores 0-{args.threads - 1}" if args.threads else "vLLM's default thread binding"
    lines.append(f"\nvLLM {args.dtype}, enforce_eager, prompt {args.prompt_len} tokens, prefill {args.prompts} "
                 f"prompts, decode {args.new_tokens} new tokens, median of {args.reps}, KV cache "
                 f"{args.kv_cache_gib:g} GiB, {threads}; memory: PSS of the serving processes after loading")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        Path(args.out).write_text(json.dumps(measure_one(args.one, args)))
        return []
    shared = [a for a in argv if a not in args.models]
    rows = [run_isolated(path, shared, args) for path in args.models]
    print(markdown(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                            if k not in ("one", "out", "json")},
                                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":  # vLLM's workers import this file
    main()

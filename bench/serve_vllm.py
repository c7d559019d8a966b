"""One checkpoint in vLLM's Transformers backend against plain transformers: greedy tokens and load time.

    python bench/serve_vllm.py CKPT [--max-tokens 32] [--max-model-len 512] [--dtype float32]

Needs vLLM (`pip install -e ".[serve]"` on a CPU machine, `pip install vllm` on a GPU one). Loads CKPT with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and generates greedily from a few prompts,
then builds `vllm.LLM(CKPT, model_impl="transformers", trust_remote_code=True)` and generates the same way;
prints both load times and, per prompt, how many of the generated tokens agree. A dense checkpoint works too
(loaded without remote code when it has none).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The river flows through the valley and",
    "She opened the letter and read",
]


def transformers_tokens(ckpt: str, prompts: list[list[int]], max_tokens: int, dtype: str) -> tuple[float, list]:
    import torch
    import transformers
    remote = "auto_map" in json.loads((Path(ckpt) / "config.json").read_text())
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=remote,
                                                              dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - start
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always max_tokens tokens
    out = []
    with torch.no_grad():
        for ids in prompts:
            new = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
            out.append(new.tolist())
    return load_s, out


def vllm_tokens(ckpt: str, prompts: list[list[int]], max_tokens: int, dtype: str, max_model_len: int):
    from vllm import LLM, SamplingParams
    start = time.perf_counter()
    # gpu_memory_utilization: on a CPU, the share of host memory reserved for the KV cache
    llm = LLM(ckpt, model_impl="transformers", trust_remote_code=True, dtype=dtype, enforce_eager=True,
              max_model_len=max_model_len, gpu_memory_utilization=0.15)
    load_s = time.perf_counter() - start
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    return load_s, [list(o.outputs[0].token_ids) for o in outputs]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(args.ckpt)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    hf_load, hf = transformers_tokens(args.ckpt, prompts, args.max_tokens, args.dtype)
    vl_load, vl = vllm_tokens(args.ckpt, prompts, args.max_tokens, args.dtype, args.max_model_len)
    print(f"load: transformers {hf_load:.1f} s, vLLM {vl_load:.1f} s (engine start included)")
    print("| prompt | tokens agreeing (of generated) | identical |")
    print("|---|---|---|")
    for text, a, b in zip(PROMPTS, hf, vl):
        print(f"| {text} | {agreeing_prefix(a, b)} / {len(a)} | {'yes' if a == b else 'no'} |")
    for text, a, b in zip(PROMPTS, hf, vl):
        print(f"\n{text!r}\n  transformers: {tok.decode(a)!r}\n  vLLM:         {tok.decode(b)!r}")


if __name__ == "__main__":  # vLLM's workers import this file
    main()

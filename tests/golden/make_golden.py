"""Write tests/golden/pipeline.safetensors: ranks and logits of every pipeline combination the tests cover.

Run from the repository root with the code whose behaviour is the reference:
    python tests/golden/make_golden.py
tests/test_golden.py compresses the same tiny model with the same calibration tokens and checks that every
combination still gives the same ranks and the same logits (within 1e-4 of the logits' largest magnitude:
CPUs with other vector units round differently). Regenerate only for a change that is meant to alter the
numbers, and say so in its commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
torch.set_num_threads(1)

GOLDEN = HERE / "pipeline.safetensors"
METHODS = ("svd", "asvd", "svd-llm", "fwsvd")
CORRECTORS = {"plain": {}, "refit": {"refit": True}, "eora": {"compensate": "eora", "eora_rank": 4},
              "refit+eora": {"refit": True, "compensate": "eora", "eora_rank": 4}}


def combinations() -> dict[str, dict]:
    """Name -> CompressConfig options: every method x corrector with uniform ranks, every method with WeLore,
    WeLore with both correctors, the rank-multiple / keep-dense options, loss-aware ranks with and without
    the refit and block refinement."""
    combos = {}
    for method in METHODS:
        for corr, opts in CORRECTORS.items():
            combos[f"{method}/uniform/{corr}"] = {"method": method, **opts}
        combos[f"{method}/welore/plain"] = {"method": method, "ranks": "welore"}
    combos["svd-llm/welore/refit+eora"] = {"method": "svd-llm", "ranks": "welore", **CORRECTORS["refit+eora"]}
    combos["svd-llm/uniform/multiple8"] = {"method": "svd-llm", "rank_multiple": 8}
    combos["svd/uniform/keep-k"] = {"method": "svd", "keep_dense": ["k_proj"]}
    combos["asvd/uniform/keep-k+refit"] = {"method": "asvd", "keep_dense": ["k_proj"], "refit": True}
    combos["svd-llm/loss-aware/plain"] = {"method": "svd-llm", "ranks": "loss-aware"}
    combos["svd-llm/loss-aware/refit+refine"] = {"method": "svd-llm", "ranks": "loss-aware", "refit": True,
                                                "refine": True, "refine_steps": 4, "refine_lr": 1e-3}
    return combos


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(123))


def compress(options: dict):
    """(the tiny Llama compressed with these options, ranks of every targeted module in name order, -1 = dense)."""
    from helpers_methods import calib_ids, config, model
    from rankwise.compress.pipeline import compress_model, target_shapes
    m = model("llama")
    names = sorted(target_shapes(m))
    meta = compress_model(m, calib_ids(), config(ratio=0.3, **options))
    modules = meta["modules"] if isinstance(meta, dict) else {n: s.model_dump() for n, s in meta.modules.items()}
    return m, torch.tensor([modules[n]["rank"] if n in modules else -1 for n in names])


def probe_logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=probe_ids(m.config.vocab_size)).logits[0].float()


def run(options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks of every targeted module in name order, -1 = dense; logits on the probe ids)."""
    m, ranks = compress(options)
    return ranks, probe_logits(m)


def main() -> None:
    from safetensors.torch import save_file
    tensors = {}
    for name, options in combinations().items():
        ranks, logits = run(options)
        tensors[f"{name}:ranks"] = ranks
        tensors[f"{name}:logits"] = logits.contiguous()
        print(name, "ranks", ranks.tolist()[:7], "logit[0,0]", float(logits[0, 0]))
    save_file(tensors, str(GOLDEN))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()

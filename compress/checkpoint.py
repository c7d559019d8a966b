"""Write a compressed model as a portable checkpoint, atomically; load any checkpoint back.

DIR/config.json          the source config + `rankwise` metadata + auto_map -> modeling_rankwise
DIR/*.safetensors        sharded weights (A, B and lora_A/lora_B factors by name)
DIR/modeling_rankwise.py compress/lowrank.py + the classes of the source architecture (lowrank.modeling_source):
                         `from_pretrained(DIR, trust_remote_code=True)` works, and so does vLLM
DIR/tokenizer files, generation_config.json, README.md (model card)
Everything is written to a temporary sibling folder first and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Iterable

from rankwise.errors import RankwiseError
from rankwise.compress.outputs import atomic_output_dir, check_output_dir, json_text  # noqa: F401 (the writers' entry points)
from rankwise.compress import lowrank
from rankwise.compress.describe import budget_asked, pipeline_name
from rankwise.compress.lowrank import AUTO_MAP, RANKWISE_KEY, checkpoint_file
from rankwise.compress.metadata import CompressionResult


def package_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("rankwise", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _shared_name(ref: str) -> str:
    """A hub id as given; a local file or folder by its name only: a card is published, the path is not."""
    kind, sep, path = ref.partition(":") if ref.startswith(("text:", "jsonl:")) else ("", "", ref)
    if sep:  # a local text file, e.g. text:/data/wiki.txt -> text:wiki.txt
        return f"{kind}:{Path(path).name}"
    return Path(ref).name if os.path.isabs(ref) or os.path.exists(ref) else ref


def model_card(meta: CompressionResult) -> str:
    ranks = [m.rank for m in meta.modules.values() if m.rank]
    cal = meta.calibration
    source = meta.source_model or "model"
    is_hub_id = not (os.path.isabs(source) or os.path.exists(source))
    base_model = f"base_model: {source}\n" if is_hub_id else ""  # the card's base_model is a hub id
    return f"""---
library_name: transformers
tags: [rankwise, low-rank, svd, compression]
{base_model}---
# {_shared_name(source)} compressed with Rankwise ({pipeline_name(meta)})

Low-rank factorization of every decoder Linear (W ~ B A) with `{meta.method}`, rank allocation
`{meta.ranks_allocation}`.

| | value |
|---|---|
| budget | {budget_asked(meta)} |
| ratio achieved (fraction of targeted parameters removed) | {meta.ratio_achieved:.4f} |
| targeted Linear bytes, 16-bit / stored | {meta.targeted_bytes_before or 0:,} / {meta.targeted_bytes_after or 0:,} |
| targeted parameters before / after | {meta.targeted_params_before:,} / {meta.targeted_params_after:,} |
| model parameters before / after | {meta.model_params_before:,} / {meta.model_params_after:,} |
| factorized / kept dense | {len(ranks)} / {len(meta.kept_dense)} |
| rank min / max | {min(ranks) if ranks else '-'} / {max(ranks) if ranks else '-'} |
| calibration | {_shared_name(cal.source)}, {cal.nsamples} x {cal.seqlen} tokens, seed {cal.seed} |

Load it with Rankwise (`compress evaluate DIR`) or with plain transformers:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
```
`trust_remote_code` runs `modeling_rankwise.py` from this folder: the low-rank layers, and the source
architecture's transformers classes that build them from `config.json`. vLLM serves it through its
Transformers backend:

```
vllm serve DIR --model-impl transformers --trust-remote-code
```
"""


def save_checkpoint(model, tokenizer, out_dir: str | Path, meta: CompressionResult, overwrite: bool = False,
                    max_shard_size: str = "2GB", inputs: Iterable[str | Path] = ()) -> Path:
    """`inputs`: paths the run read (model, text), which --overwrite must never delete."""
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        meta.versions = package_versions()
        cfg[RANKWISE_KEY] = meta.to_json()
        cfg["auto_map"] = AUTO_MAP
        cfg_path.write_text(json_text(cfg, f"{out_dir}/config.json", indent=2, sort_keys=True))
        (tmp / "modeling_rankwise.py").write_text(lowrank.modeling_source(model.config), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            copy_tokenizer_code(tmp, meta.compressed_model or meta.source_model, runs_own_code(tokenizer))
        (tmp / "README.md").write_text(model_card(meta))
    return Path(out_dir)


def runs_own_code(tokenizer) -> bool:
    """Whether the tokenizer was loaded with its own code (the user passed trust_remote_code): transformers
    imports such code into its `transformers_modules` package."""
    return type(tokenizer).__module__.startswith("transformers_modules")


def copy_tokenizer_code(folder: Path, source: str | None, trusted: bool) -> None:
    """A tokenizer with its own code names it in tokenizer_config.json's auto_map. Trusted (it was loaded with
    that code): copy those modules from the source model so the written folder loads with trust_remote_code
    (tokenizers do not copy them). Not trusted: the written folder names no code (its auto_map is dropped), so
    code the user never ran is neither copied nor run later by a `trust_remote_code=True` load."""
    cfg_path = folder / "tokenizer_config.json"
    if source is None or not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    refs = cfg.get("auto_map") or {}
    if refs and not trusted:
        del cfg["auto_map"]
        cfg_path.write_text(json_text(cfg, "tokenizer_config.json", indent=2, ensure_ascii=False))
        return
    for ref in (r for v in refs.values() for r in (v if isinstance(v, list) else [v]) if r):
        module = ref.split("--")[-1].rpartition(".")[0] + ".py"  # "repo--module.Class" or "module.Class"
        if (folder / module).exists():
            continue
        found = checkpoint_file(source, module, required=False)
        if found is None:
            raise RankwiseError(f"the tokenizer's auto_map names {module!r}, which {source!r} does not hold")
        shutil.copyfile(found, folder / module)

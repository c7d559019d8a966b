"""Write a compressed model as a portable checkpoint, atomically; load any checkpoint back.

DIR/config.json          the source config + `rankwise` metadata + auto_map -> modeling_rankwise
DIR/*.safetensors        sharded weights (A, B and lora_A/lora_B factors by name)
DIR/modeling_rankwise.py a copy of compress/lowrank.py: `from_pretrained(DIR, trust_remote_code=True)` works
DIR/tokenizer files, generation_config.json, README.md (model card)
Everything is written to a temporary sibling folder first and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.compress import lowrank
from rankwise.compress.lowrank import RANKWISE_KEY
from rankwise.compress.metadata import CompressionResult

AUTO_MAP = {"AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if the output exists and --overwrite was not given."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise RankwiseError(f"output directory {str(out)!r} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise RankwiseError(f"output path {str(out)!r} exists and is not a directory")
    return out


def package_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("rankwise", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def model_card(meta: CompressionResult) -> str:
    ranks = [m.rank for m in meta.modules.values() if m.rank]
    cal = meta.calibration
    return f"""---
library_name: transformers
tags: [rankwise, low-rank, svd, compression]
base_model: {meta.source_model}
---
# {Path(meta.source_model or 'model').name} compressed with Rankwise ({meta.method})

Low-rank factorization of every decoder Linear (W ~ B A) with `{meta.method}`, rank allocation
`{meta.ranks_allocation}`.

| | value |
|---|---|
| ratio requested (fraction of targeted parameters removed) | {meta.ratio_requested:.4f} |
| ratio achieved (targeted Linears) | {meta.ratio_achieved:.4f} |
| targeted parameters before / after | {meta.targeted_params_before:,} / {meta.targeted_params_after:,} |
| model parameters before / after | {meta.model_params_before:,} / {meta.model_params_after:,} |
| factorized / kept dense | {len(ranks)} / {len(meta.kept_dense)} |
| rank min / max | {min(ranks) if ranks else '-'} / {max(ranks) if ranks else '-'} |
| calibration | {cal.source}, {cal.nsamples} x {cal.seqlen} tokens, seed {cal.seed} |

Load it with Rankwise (`compress evaluate DIR`) or with plain transformers:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
```
`trust_remote_code` runs `modeling_rankwise.py` from this folder (the low-rank layer definition, ~200 lines).
"""


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` (swapped in, then the
    old one dropped, with --overwrite), on any failure it is removed: never a half-written output."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, tokenizer, out_dir: str | Path, meta: CompressionResult, overwrite: bool = False,
                    max_shard_size: str = "2GB") -> Path:
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        meta.versions = package_versions()
        cfg[RANKWISE_KEY] = meta.to_json()
        cfg["auto_map"] = AUTO_MAP
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(lowrank.__file__, tmp / "modeling_rankwise.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(meta))
    return Path(out_dir)


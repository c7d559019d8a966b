"""Export the EoRA residual paths of a compressed model as a PEFT LoRA adapter, and load it back.

The residual path sits beside a LowRankLinear (x -> B A x), an nn.Linear that stores its weight as factors:
PEFT's stock `lora.Linear` wraps it as any Linear, computing base(x) + lora_B(lora_A(x)) * scaling. Dense
layers that carry a path (LoraLinear, e.g. `compress compensate` on a pruned or quantized model) export their
plain nn.Linear base directly.

Files: adapter_model.safetensors + adapter_config.json (rank_pattern / alpha_pattern give per-module ranks;
alpha = r so the scaling is 1, the EoRA path exactly; task_type CAUSAL_LM, so that AutoPeftModelForCausalLM
loads the base through AutoModelForCausalLM and its auto_map, never as the plain architecture class with
random low-rank layers), README.md with the load snippets, and base/: the checkpoint without its EoRA paths,
which `base_model_name_or_path` names. Every PEFT loading path works on it: `model.load_adapter(DIR)` on the
base loaded with `trust_remote_code`, `PeftModel.from_pretrained(base, DIR)`, and
`AutoPeftModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from rankwise.compress.metadata import CompressionResult
from rankwise.compress.lowrank import LoraLinear, LowRankLinear, get_submodule_parent

BASE_DIR = "base"  # the checkpoint without EoRA paths, inside the adapter folder


def _lora_config(ranks: dict[str, int]):
    from peft import LoraConfig
    r0 = max(ranks.values())
    return LoraConfig(
        r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
        lora_dropout=0.0, bias="none", init_lora_weights=False, task_type="CAUSAL_LM")


def strip_compensation(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Remove every EoRA path from `model` in place (LoraLinear -> its base). Returns name -> (lora_B, lora_A)."""
    paths = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowRankLinear) and mod.lora_rank:
            paths[name] = (mod.lora_B.weight.detach().clone(), mod.lora_A.weight.detach().clone())
            del mod.lora_A, mod.lora_B
            mod.lora_rank = 0
        elif isinstance(mod, LoraLinear):
            paths[name] = (mod.lora_B.weight.detach().clone(), mod.lora_A.weight.detach().clone())
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, mod.base)
    return paths


def export_eora_adapter(model: nn.Module, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write the model's EoRA paths as a PEFT adapter. `model` is left without its paths (the base)."""
    from peft import get_peft_model
    paths = strip_compensation(model)
    if not paths:
        from rankwise.errors import RankwiseError
        raise RankwiseError("the model has no EoRA compensation path to export")
    with quiet_peft():
        peft_model = get_peft_model(model, _lora_config({n: a.shape[0] for n, (b, a) in paths.items()}))
    if base_model_name is not None:  # set after get_peft_model, which fills it from the model's own name
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name
    with torch.no_grad():
        for name, (lB, lA) in paths.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lA)
            layer.lora_B["default"].weight.copy_(lB)
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # LoRA on Linears only
    peft_model.unload()  # `model` back to the base, without PEFT's wrappers
    return Path(out_dir)


def base_meta(meta: CompressionResult) -> CompressionResult:
    """The compression record of the checkpoint once its EoRA paths are stripped (layers that were dense
    with only a path are plain Linears again and leave the record)."""
    return meta.without_compensation()


def adapter_card(adapter: str, base: str, n_paths: int) -> str:
    return f"""---
library_name: peft
tags: [rankwise, eora, lora]
base_model: {base}
---
# EoRA residual paths as a LoRA adapter

{n_paths} residual low-rank paths (EoRA) of a Rankwise checkpoint, exported as a PEFT LoRA adapter (per-module
ranks in `adapter_config.json`, alpha = rank so the scaling is 1). `{BASE_DIR}/` holds the compressed checkpoint
without the paths; the adapter on top of it computes exactly what the full checkpoint computes.

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{base}", trust_remote_code=True)
model.load_adapter("{adapter}")
```

`trust_remote_code` runs the base's `modeling_rankwise.py` (its low-rank layer; `peft` must be installed).
`PeftModel.from_pretrained(model, "{adapter}")` on the base loaded as above, and
`AutoPeftModelForCausalLM.from_pretrained("{adapter}", trust_remote_code=True)` give the same model. The
low-rank layers hold no dense weight, so the adapter cannot be merged into them (`merge_and_unload`).
"""


def load_eora_adapter(base: nn.Module, adapter_dir: str | Path):
    """PeftModel of `base` (a checkpoint without its EoRA paths) with the exported adapter loaded."""
    from peft import PeftModel
    with quiet_peft():
        return PeftModel.from_pretrained(base, str(adapter_dir))


@contextlib.contextmanager
def quiet_peft():
    """PEFT calls transformers' deprecated names (FutureWarning): not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield

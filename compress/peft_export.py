"""Export the EoRA residual paths of a compressed model as a PEFT LoRA adapter, and load it back.

The residual path sits beside a LowRankLinear (x -> B A x), which PEFT's stock LoRA cannot target (it wraps
nn.Linear-like layers). PEFT's custom-module API (`LoraConfig._register_custom_module`) maps our layer type to
a LoRA layer class; peft's own `lora.Linear` already computes base(x) + lora_B(lora_A(x)) * scaling and only
needs in/out features from the base, so it serves as that class. Dense layers that carry a path (LoraLinear,
e.g. `compress compensate` on a pruned or quantized model) export their plain nn.Linear base directly.

Files: adapter_model.safetensors + adapter_config.json (rank_pattern / alpha_pattern give per-module ranks;
alpha = r so the scaling is 1, the EoRA path exactly). The adapter loads onto the checkpoint with its EoRA
paths stripped (the base), via `load_eora_adapter`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rankwise.compress.lowrank import LoraLinear, LowRankLinear, get_submodule_parent


def _lora_config(ranks: dict[str, int], base_model_name: str | None = None):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    r0 = max(ranks.values())
    cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=dict(ranks),
                     alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none", init_lora_weights=False,
                     base_model_name_or_path=base_model_name)
    cfg._register_custom_module({LowRankLinear: PeftLoraLinear})
    return cfg


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
    peft_model = get_peft_model(model, _lora_config({n: a.shape[0] for n, (b, a) in paths.items()},
                                                    base_model_name))
    with torch.no_grad():
        for name, (lB, lA) in paths.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lA)
            layer.lora_B["default"].weight.copy_(lB)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def load_eora_adapter(base: nn.Module, adapter_dir: str | Path):
    """PeftModel of `base` (a checkpoint without its EoRA paths) with the exported adapter loaded."""
    from peft import LoraConfig, PeftModel
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    cfg._register_custom_module({LowRankLinear: PeftLoraLinear})
    return PeftModel.from_pretrained(base, str(adapter_dir), config=cfg)

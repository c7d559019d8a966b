"""Find decoder blocks and their Linears in any transformers causal LM, without per-family code, and walk them
on the calibration batch (`block_runner`)."""
from __future__ import annotations

import torch
from torch import nn

from rankwise.calib.runner import BlockRunner
from rankwise.errors import RankwiseError
from rankwise.compress.lowrank import LoraLinear, LowRankLinear

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, key, None):
            return int(getattr(text, key))
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks: length = the config's layer count, most parameters.

    Vision towers of multimodal models also hold ModuleLists; the layer count of the text config and the
    parameter count pick the language model's.
    """
    want = num_layers(model.config)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if want is not None and len(mod) != want:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise RankwiseError(f"unsupported architecture {type(model).__name__}: no list of {want} decoder blocks "
                            f"found")
    return best[0], best[1]


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All dense Linears of a block by qualified name (Conv1D of GPT-2 included; factorized ones skipped)."""
    found = {}
    skip_under: list[str] = []
    for name, mod in block.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        if isinstance(mod, (LowRankLinear, LoraLinear)):
            skip_under.append(name)
            continue
        if isinstance(mod, nn.Linear) or (Conv1D and isinstance(mod, Conv1D)):
            found[name] = mod
    return found


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W as [out, in] whatever the layer type (Conv1D stores its transpose)."""
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.t()
    return layer.weight


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    out, inp = dense_weight(layer).shape
    return int(out), int(inp)


def named_target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every targeted Linear of the model by its full name (decoder blocks only: embeddings and head stay)."""
    prefix, blocks = find_decoder_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            out[f"{prefix}.{i}.{name}"] = lin
    return out


def check_finite_weights(linears: dict[str, nn.Module]) -> None:
    """Refuse NaN / Inf in a targeted Linear's weight or bias, naming the first such layer: a factorization
    of it would be NaN (plain SVD) or fail inside an eigensolver (whitened methods). Layers still on `meta`
    (a streamed block not read yet) are checked when they are read."""
    for name, lin in linears.items():
        for kind in ("weight", "bias"):
            t = getattr(lin, kind, None)
            if t is None or t.device.type == "meta":
                continue
            # one reduction, no mask: the sum is finite only if every element is (a non-finite sum of finite
            # elements, an overflow, goes to the exact test)
            if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
                continue
            bad = int((~torch.isfinite(t)).sum())
            raise RankwiseError(f"layer {name!r} has {bad} non-finite (NaN or Inf) {kind} value(s): the "
                                f"checkpoint is damaged or was saved in a dtype that overflowed")


def block_runner(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, device: torch.device,
                 storage: torch.device, block_source=None, timer=None, progress=None) -> BlockRunner:
    """The calibration block walk (calib.runner) over this model's decoder blocks and their dense Linears."""
    prefix, blocks = find_decoder_blocks(model)
    return BlockRunner(model, prefix, blocks, find_linears, calib_ids, batch_size, device, storage,
                       block_source=block_source, timer=timer, progress=progress)

"""Low-rank Linear layers and the loader of Rankwise checkpoints.

This file is self-contained on purpose (torch, transformers, safetensors, accelerate only): every checkpoint
carries a verbatim copy as `modeling_rankwise.py`, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

rebuilds the compressed model without Rankwise installed. The project's own loader is the same code.

Checkpoint format: `config.json` is the source model's config plus a `rankwise` section whose `modules` maps
each factorized Linear's qualified name to {"rank": k, "in": n, "out": m, "bias": bool, "lora_rank": r}
(and `format_version`, see FORMAT_VERSION);
weights are stored as `<name>.A.weight` [k, n], `<name>.B.weight` [m, k] (+ `<name>.B.bias`) and, for a
compensated layer, `<name>.lora_A.weight` [r, n], `<name>.lora_B.weight` [m, r].
"""
from __future__ import annotations

import json
import os
import shutil
import types

import torch
from torch import nn

try:  # transformers is always present where checkpoints are loaded; the layer itself needs only torch
    import transformers
    from transformers import PreTrainedModel
except ImportError:  # pragma: no cover
    transformers = None
    PreTrainedModel = nn.Module

RANKWISE_KEY = "rankwise"
FORMAT_VERSION = 2  # layout of the `rankwise` section; a loader refuses a newer one (compress/metadata.py)
AUTO_MAP = {"AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}


class LowRankLinear(nn.Linear):
    """y = B(A x) [+ lora_B(lora_A x)]: a rank-k factorization W ~ B A of a dense Linear, bias kept in B.

    The optional lora path is a residual correction (EoRA compensation) kept separate so it can be exported
    as an adapter or dropped. It is an nn.Linear (same in/out features, `weight` and `bias` the ones it
    computes) that stores no dense weight, so that PEFT's stock LoRA targets it like any Linear: an exported
    adapter loads through every PEFT path without registering a custom layer. `weight` is read-only
    (computed): merging an adapter into it is not possible.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 lora_rank: int = 0, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the dense weight this layer replaces
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=bias, **kw)
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_A = nn.Linear(in_features, lora_rank, bias=False, **kw)
            self.lora_B = nn.Linear(lora_rank, out_features, bias=False, **kw)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from B [m, k] and A [k, n]; the factors are cast to `dtype` (default: B's dtype)."""
        dtype = dtype or B.dtype
        m, k = B.shape
        layer = cls(A.shape[1], m, k, bias=bias is not None, device=B.device, dtype=dtype)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.B.bias.copy_(bias)
        return layer

    def add_lora(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> None:
        """Attach (or replace) the residual path lora_B @ lora_A."""
        r = lora_A.shape[0]
        kw = {"device": self.A.weight.device, "dtype": self.A.weight.dtype}
        self.lora_rank = r
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_A)
            self.lora_B.weight.copy_(lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes (for inspection; forward never materialises it)."""
        w = self.B.weight @ self.A.weight
        if self.lora_rank:
            w = w + self.lora_B.weight @ self.lora_A.weight
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.B(self.A(x))
        if self.lora_rank:
            y = y + self.lora_B(self.lora_A(x))
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"bias={self.B.bias is not None}, lora_rank={self.lora_rank}")


class LoraLinear(nn.Module):
    """A dense Linear (pruned, quantized or kept dense) plus a residual low-rank path (EoRA on any model)."""

    def __init__(self, base: nn.Module, lora_rank: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_rank = lora_rank
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, lora_rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(lora_rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def apply_structure(model: nn.Module, modules: dict, device=None, dtype=None) -> None:
    """Replace the Linears named in a checkpoint's `rankwise.modules` by empty layers of the stored shapes."""
    for name, spec in modules.items():
        parent, child = get_submodule_parent(model, name)
        if spec.get("rank") is None:  # dense layer that only carries a compensation path
            setattr(parent, child, LoraLinear(getattr(parent, child), spec["lora_rank"]))
            continue
        setattr(parent, child, LowRankLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"],
                                             lora_rank=spec.get("lora_rank", 0), device=device, dtype=dtype))


def _base_model_class(config):
    """The transformers class the checkpoint was made from (never the auto_map shell, to avoid recursion)."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def checkpoint_file(path: str, filename: str, required: bool = True, **hub_kwargs) -> str | None:
    """A file of a checkpoint: in a local folder, or from the hub cache / the hub for a hub id (what
    transformers itself reads). None when an optional file is absent."""
    if os.path.isdir(path):
        full = os.path.join(path, filename)
        if os.path.isfile(full) or required:
            return full
        return None
    from transformers.utils import cached_file
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=required, **hub_kwargs)


def _read_state_dict(path: str, **hub_kwargs) -> dict:
    from safetensors.torch import load_file
    index = checkpoint_file(path, "model.safetensors.index.json", required=False, **hub_kwargs)
    if index is not None:
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for fname in files:
        state.update(load_file(checkpoint_file(path, fname, **hub_kwargs)))
    return state


class CheckpointError(ValueError):
    """A Rankwise checkpoint whose tensors do not match its config.json."""


def first_nonfinite(named_tensors) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor holding NaN or Inf, else None. One reduction per
    tensor, no mask: the sum is finite only if every element is (a non-finite sum of finite elements, an
    overflow, goes to the exact test). Tensors on `meta` hold no values yet and are skipped."""
    for name, t in named_tensors:
        if not t.is_floating_point() or t.device.type == "meta" or bool(torch.isfinite(t.sum())):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return name, bad
    return None


def nonfinite_message(where: str, name: str, count: int) -> str:
    return (f"{where}: tensor {name!r} has {count} non-finite (NaN or Inf) value(s): the checkpoint is damaged "
            f"or was saved in a dtype that overflowed")


def _check_shapes(path: str, model: nn.Module, state: dict, modules: dict) -> None:
    """Name the module, the shape config.json implies and the stored one (load_state_dict names neither)."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            module = next((m for m in modules if name.startswith(m + ".")), name.rpartition(".")[0])
            spec = modules.get(module, {})
            ranks = f" (config.json: rank {spec.get('rank')}, lora_rank {spec.get('lora_rank', 0)})" if spec else ""
            raise CheckpointError(f"{path}: module {module!r}{ranks} expects {name} of shape "
                                  f"{list(expected[name].shape)}, the checkpoint holds {list(tensor.shape)}")


def _save_pretrained_with_modeling_file(self, save_directory, *args, **kwargs):
    """The base class's save_pretrained, then what makes the folder load again: config.json (which keeps the
    `rankwise` section) gets a local auto_map, and this file is copied beside it as modeling_rankwise.py."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    cfg_path = os.path.join(save_directory, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["auto_map"] = dict(AUTO_MAP)
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n")  # JSON has no NaN
    shutil.copyfile(__file__, os.path.join(save_directory, "modeling_rankwise.py"))
    return out


def load_rankwise_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        config=None, **hub_kwargs):
    """Rebuild a Rankwise checkpoint (local folder or hub id): base architecture with empty weights,
    low-rank modules, stored tensors. Every stored tensor must fill a parameter of the right shape, and
    every parameter must be filled: nothing is left randomly initialised."""
    from accelerate import init_empty_weights
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
    meta = getattr(config, RANKWISE_KEY, None)
    if not meta:
        raise CheckpointError(f"{path} is not a Rankwise checkpoint (config.json has no '{RANKWISE_KEY}' section)")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: rankwise format_version {meta['format_version']} is newer than this "
                              f"loader reads ({FORMAT_VERSION})")
    model_cls = _base_model_class(config)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = model_cls(config)
    apply_structure(model, meta["modules"], device="meta")
    state = _read_state_dict(path, **hub_kwargs)
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise CheckpointError(nonfinite_message(path, *bad))
    _check_shapes(path, model, state, meta["modules"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{path}: tensors in the checkpoint that config.json's modules do not have: "
                              f"{sorted(unexpected)[:3]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {still_meta[:3]}")
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    # bound to this instance (the base class knows nothing of this file); a deepcopy binds it to the copy
    model.save_pretrained = types.MethodType(_save_pretrained_with_modeling_file, model)
    return model.eval()


class RankwiseForCausalLM(PreTrainedModel):
    """Shell named by `auto_map`: its from_pretrained returns the base model class with low-rank layers."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        device = kwargs.get("device_map") or "cpu"
        if not isinstance(device, (str, torch.device)):
            device = "cpu"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        return load_rankwise_model(str(pretrained_model_name_or_path), dtype=dtype, device=device,
                                   config=config, **hub_kwargs)

"""Low-rank Linear layers and the loader of Rankwise checkpoints.

This file is self-contained on purpose (torch, transformers, safetensors, accelerate only): every checkpoint
carries it as `modeling_rankwise.py`, followed by a few generated lines that name the architecture the
checkpoint was compressed from (`modeling_source`), so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # or AutoModel
    AutoModel.from_config(AutoConfig.from_pretrained(DIR), trust_remote_code=True)

build the compressed model without Rankwise installed: `RankwiseForCausalLM` and `RankwiseModel` are that
architecture's classes, which build the low-rank layers from config.json (vLLM's Transformers backend
constructs `RankwiseModel` this way, on meta, and loads the factors itself). The project's own loader is
the same code.

Checkpoint format: `config.json` is the source model's config plus a `rankwise` section whose `modules` maps
each factorized Linear's qualified name to {"rank": k, "in": n, "out": m, "bias": bool, "lora_rank": r}
(and `format_version`, see FORMAT_VERSION), plus "factor_dtype" and "group_size" when the factors are
stored in another dtype than the model's (FACTOR_DTYPES);
weights are stored as `<name>.A.weight` [k, n], `<name>.B.weight` [m, k] (+ `<name>.B.bias`) and, for a
compensated layer, `<name>.lora_A.weight` [r, n], `<name>.lora_B.weight` [m, r]. Factors stored in int8 hold
`<name>.A.weight` int8 [k, n] and `<name>.A.weight_scale` float32 [k] (one scale per output channel; B alike);
in int4, `<name>.A.weight` uint8 [k, n / 2] (two values per byte) and `<name>.A.weight_scale` float32
[k, n / group_size] (one scale per group of inputs).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers is always present where checkpoints are loaded; the layer itself needs only torch
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

RANKWISE_KEY = "rankwise"
FORMAT_VERSION = 2  # layout of the `rankwise` section; a loader refuses a newer one (compress/metadata.py)
AUTO_MAP = {"AutoModel": "modeling_rankwise.RankwiseModel",
            "AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}


# How the factors A and B are stored: "auto" in the model's dtype, a float dtype, or quantized (Int8Linear,
# Int4Linear); biases and residual paths stay in the model's dtype.
FACTOR_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")
FLOAT_FACTOR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT4_GROUP_DEFAULT = 32


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized (integer `weight`, float32 `weight_scale`, optional float
    `bias`); subclasses say how it is rounded and dequantized."""

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        """Load (name, tensor) pairs the way vLLM's weight loader hands them to a module that has this method.
        vLLM has already put every parameter on its device in the model's dtype, integer ones too: integer
        tensors are loaded in their stored dtype (an int8 weight stays int8), floating ones in the parameter's,
        as from_pretrained(dtype=...) casts them. The names loaded."""
        loaded = set()
        for name, tensor in weights:
            param = getattr(self, name)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: expected shape {list(param.shape)}, got {list(tensor.shape)}")
            if tensor.is_floating_point():
                param.data.copy_(tensor)
            else:
                stored = torch.empty(tensor.shape, dtype=tensor.dtype, device=param.device).copy_(tensor)
                setattr(self, name, nn.Parameter(stored, requires_grad=False))
            loaded.add(name)
        return loaded


class Int8Linear(QuantizedLinear):
    """y = x (s Q)^T + b: an int8 weight Q [out, in] with one float32 scale per output channel, s = absmax / 127
    (symmetric, round to nearest). Q stays int8 in memory; each call dequantizes it for one matmul (the float
    copy lives for that call only). torch's weight-only int8 kernel (aten._weight_int8pack_mm) is not used: on
    an AVX2 CPU with torch 2.13 it runs 3-40x slower than dequantize + matmul at 1 to 2048 tokens
    (bench/int8_matmul.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 group_size: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-30) / 127
        self.weight = nn.Parameter(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s Q in `dtype`: the weight this layer computes with."""
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, bias={self.bias is not None}"


class Int4Linear(QuantizedLinear):
    """y = x (s Q)^T + b: int4 values Q in [-8, 7] [out, in], two per byte (uint8 [out, in / 2], the even input
    in the low nibble), one float32 scale per group of `group_size` inputs of each output, s = absmax / 7
    (symmetric, group-wise). Dequantized to x's dtype per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 group_size: int = INT4_GROUP_DEFAULT):
        super().__init__()
        if group_size < 2 or group_size % 2 or in_features % group_size:
            raise ValueError(f"int4 group size {group_size} must be even and divide the {in_features} inputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, in_features // group_size, dtype=torch.float32,
                                                     device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        w = weight.detach().float().reshape(self.out_features, -1, self.group_size)
        scale = w.abs().amax(2).clamp_min(1e-30) / 7
        q = (torch.round(w / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(self.out_features, -1)
        self.weight = nn.Parameter(q[:, 0::2] | (q[:, 1::2] << 4), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s Q in `dtype`: the weight this layer computes with."""
        q = torch.stack((self.weight & 15, self.weight >> 4), -1).reshape(self.out_features, -1).float() - 8
        q = q.reshape(self.out_features, -1, self.group_size) * self.weight_scale.float()[..., None]
        return q.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group {self.group_size}, "
                f"bias={self.bias is not None}")


QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def factor_linear(in_features: int, out_features: int, bias: bool, storage: str | None, group_size: int,
                  device=None, dtype=None) -> nn.Module:
    """An empty factor (A or B) stored as `storage` (None or "auto": in `dtype`)."""
    if storage in QUANTIZED_LINEARS:
        return QUANTIZED_LINEARS[storage](in_features, out_features, bias=bias, device=device, dtype=dtype,
                                          group_size=group_size)
    return nn.Linear(in_features, out_features, bias=bias, device=device,
                     dtype=FLOAT_FACTOR_DTYPES.get(storage, dtype))


def factor_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a factor computes with (dequantized when stored quantized)."""
    return layer.dequantized() if isinstance(layer, QuantizedLinear) else layer.weight


class LowRankFactors(nn.Module):
    """y = B(A x) [+ lora_B(lora_A x)]: a rank-k factorization W ~ B A of a dense Linear, bias kept in B.

    The optional lora path is a residual correction (EoRA compensation) kept separate so it can be exported
    as an adapter or dropped. Not an nn.Linear: an engine that swaps every nn.Linear for its own dense kernel
    (vLLM's Transformers backend) swaps A and B (and the lora pair) instead, and loads `<name>.A.weight` and
    `<name>.B.weight` into them. `weight` and `bias` are the ones it computes (read-only). `factor_dtype`
    (FACTOR_DTYPES; None: `dtype`) is how A and B are stored; a float one computes in that dtype (the input
    cast to it, the output back).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 lora_rank: int = 0, device=None, dtype=None, factor_dtype: str | None = None,
                 group_size: int = 0):
        nn.Module.__init__(self)  # never nn.Linear's (LowRankLinear): it would allocate the dense weight
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.factor_dtype, self.group_size = None, 0
        kw = {"device": device, "dtype": dtype}
        if factor_dtype in (None, "auto"):
            self.A = nn.Linear(in_features, rank, bias=False, **kw)
            self.B = nn.Linear(rank, out_features, bias=bias, **kw)
        else:
            self.A = factor_linear(in_features, rank, False, factor_dtype, group_size, **kw)
            self.B = factor_linear(rank, out_features, bias, factor_dtype, group_size, **kw)
            self.factor_dtype, self.group_size = factor_dtype, group_size if factor_dtype == "int4" else 0
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_A = nn.Linear(in_features, lora_rank, bias=False, **kw)
            self.lora_B = nn.Linear(lora_rank, out_features, bias=False, **kw)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype | None = None) -> "LowRankFactors":
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

    @torch.no_grad()
    def store_factors(self, factor_dtype: str, group_size: int = INT4_GROUP_DEFAULT) -> None:
        """Store A and B as `factor_dtype` (FACTOR_DTYPES; "auto" leaves them as they are). Quantized: each
        factor rounded on its own (per output channel for int8, per group of inputs for int4)."""
        if factor_dtype in (None, "auto"):
            return
        for name, (n, m, bias) in (("A", (self.in_features, self.rank, False)),
                                   ("B", (self.rank, self.out_features, self.B.bias is not None))):
            old = getattr(self, name)
            new = factor_linear(n, m, bias, factor_dtype, group_size, device=old.weight.device,
                               dtype=old.bias.dtype if bias else old.weight.dtype)
            if factor_dtype in QUANTIZED_LINEARS:
                new.set_weight(factor_weight(old))
            else:
                new.weight.copy_(factor_weight(old))
            if bias:
                new.bias.copy_(old.bias)
            setattr(self, name, new)
        self.factor_dtype, self.group_size = factor_dtype, group_size if factor_dtype == "int4" else 0

    def add_lora(self, lora_B: torch.Tensor, lora_A: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Attach (or replace) the residual path lora_B @ lora_A, in `dtype` (default: the factors' dtype, or
        lora_A's when the factors are stored in another one than the model's)."""
        r = lora_A.shape[0]
        dtype = dtype or (self.A.weight.dtype if self.factor_dtype is None else lora_A.dtype)
        kw = {"device": self.A.weight.device, "dtype": dtype}
        self.lora_rank = r
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_A)
            self.lora_B.weight.copy_(lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes (for inspection; forward never materialises it)."""
        w = factor_weight(self.B) @ factor_weight(self.A).to(factor_weight(self.B).dtype)
        if self.lora_rank:
            w = w.to(self.lora_A.weight.dtype) + self.lora_B.weight @ self.lora_A.weight
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.A.weight.dtype) if self.factor_dtype in FLOAT_FACTOR_DTYPES else x
        y = self.B(self.A(h)).to(x.dtype)
        if self.lora_rank:
            y = y + self.lora_B(self.lora_A(x))
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"bias={self.B.bias is not None}, lora_rank={self.lora_rank}"
                + (f", factors {self.factor_dtype}" if self.factor_dtype else ""))


class LowRankLinear(LowRankFactors, nn.Linear):
    """The same layer as an nn.Linear (same in/out features, `weight` and `bias` the ones it computes) that
    stores no dense weight, so that PEFT's stock LoRA targets it like any Linear: an exported adapter loads
    through every PEFT path without registering a custom layer. `weight` is computed: merging an adapter into
    it is not possible."""


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


def apply_structure(model: nn.Module, modules: dict, layer: type = LowRankLinear) -> None:
    """Replace the Linears named in `modules` (a checkpoint's `rankwise.modules`, names relative to `model`) by
    empty `layer`s of the stored shapes, on the device and in the dtype of the Linear each replaces."""
    for name, spec in modules.items():
        parent, child = get_submodule_parent(model, name)
        dense = getattr(parent, child)
        if spec.get("rank") is None:  # dense layer that only carries a compensation path
            setattr(parent, child, LoraLinear(dense, spec["lora_rank"]))
            continue
        setattr(parent, child, layer(spec["in"], spec["out"], spec["rank"], bias=spec["bias"],
                                     lora_rank=spec.get("lora_rank", 0), device=dense.weight.device,
                                     dtype=dense.weight.dtype, factor_dtype=spec.get("factor_dtype"),
                                     group_size=spec.get("group_size", 0)))


def relative_to(model: nn.Module, named: dict) -> dict:
    """Module or tensor names stored relative to the causal LM, relative to `model`: a base model (what
    AutoModel builds) holds those under its prefix (`model.`); the rest (the head) is not in it."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", model) is not model:  # the causal LM itself
        return dict(named)
    return {n[len(prefix) + 1:]: v for n, v in named.items() if n.startswith(prefix + ".")}


def source_classes(config) -> tuple[type, type]:
    """(causal LM class, base model class) of the transformers architecture the checkpoint was compressed
    from: the one config.json's `architectures` names, else the one transformers maps its config to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
    named = [getattr(transformers, arch) for arch in getattr(config, "architectures", None) or []
             if hasattr(transformers, arch)]
    return (named[0] if named else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]), MODEL_MAPPING[type(config)]


_PATTERN_CLASSES: dict = {}


def separate_fusion_patterns(model: nn.Module) -> None:
    """vLLM's Transformers backend decides which sibling Linears it fuses (gate + up, q + k + v) once per module
    class and child names, then applies that to every module of the class: a fusion found in a block whose
    gate and up are dense would replace a low-rank up elsewhere. Each module with low-rank children gets a
    class of its own per set of them (the same code, a subclass), so a fusion is decided where it applies."""
    for module in list(model.modules()):
        low = tuple(n for n, c in module.named_children() if isinstance(c, (LowRankFactors, LoraLinear))
                    and not isinstance(c, nn.Linear))
        if low:
            key = (type(module), low)
            if key not in _PATTERN_CLASSES:
                base = type(module)
                _PATTERN_CLASSES[key] = type(f"{base.__name__}LowRank_{'_'.join(low)}", (base,),
                                             {"__module__": base.__module__})
            module.__class__ = _PATTERN_CLASSES[key]


class RankwiseStructure:
    """Put before a transformers model class (`rankwise_class`): the architecture, built from a config with a
    `rankwise` section, holds the checkpoint's low-rank layers (empty until loaded), however it is built:
    from_pretrained, from_config, or by vLLM (AutoModel.from_config on meta, then its own weight loading)."""

    low_rank_layer: type = LowRankLinear

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        section = getattr(config, RANKWISE_KEY, None) or {}
        apply_structure(self, relative_to(self, section.get("modules", {})), self.low_rank_layer)
        if not issubclass(self.low_rank_layer, nn.Linear):  # the base model, which vLLM builds
            separate_fusion_patterns(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """load_rankwise_model: every tensor checked against config.json, none left random."""
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
                                   config=config, model_class=cls, **hub_kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The base class's save_pretrained, then what makes the folder load again (write_checkpoint_code)."""
        architectures = self.config.architectures  # the base class writes this class's name there
        out = super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = architectures
        write_checkpoint_code(str(save_directory), self.config)
        return out


_CLASSES: dict = {}


def rankwise_class(name: str, source: type, layer: type) -> type:
    """The transformers model class `source` with the checkpoint's low-rank layers as `layer`s, named `name`
    in this module. The causal LM's layers are LowRankLinear (PEFT targets them); the base model's, which
    vLLM builds, LowRankFactors (vLLM replaces every nn.Linear by a dense one of its own)."""
    key = (name, source, layer)
    if key not in _CLASSES:
        doc = f"{source.__name__} with the low-rank layers config.json's `{RANKWISE_KEY}.modules` names."
        _CLASSES[key] = type(name, (RankwiseStructure, source), {
            "__module__": __name__, "__qualname__": name, "__doc__": doc, "low_rank_layer": layer})
    return _CLASSES[key]


# The generated tail of a checkpoint's modeling_rankwise.py starts with this line.
_GENERATED = "# " + "=" * 8 + " generated for the architecture this checkpoint was compressed from"


def modeling_source(config) -> str:
    """A checkpoint's modeling_rankwise.py: this file's code, then `RankwiseModel` and `RankwiseForCausalLM`,
    the auto_map classes, for the checkpoint's architecture (the same text however often it is re-saved)."""
    with open(__file__, encoding="utf-8") as f:
        code = f.read().split("\n" + _GENERATED)[0].rstrip("\n")
    causal, base = source_classes(config)
    for cls in (causal, base):
        if getattr(transformers, cls.__name__, None) is not cls:
            raise ValueError(f"{cls.__module__}.{cls.__name__} is not a transformers class: a Rankwise "
                             f"checkpoint's modeling file can only extend those")
    return (f"{code}\n\n\n{_GENERATED}\n"
            f"from transformers import {causal.__name__}, {base.__name__}  # noqa: E402\n\n"
            f"RankwiseModel = rankwise_class(\"RankwiseModel\", {base.__name__}, LowRankFactors)\n"
            f"RankwiseForCausalLM = rankwise_class(\"RankwiseForCausalLM\", {causal.__name__}, LowRankLinear)\n")


def write_checkpoint_code(folder: str, config) -> None:
    """What makes a saved folder load as a Rankwise checkpoint: config.json (which keeps the `rankwise`
    section) names the source architecture and the auto_map classes; modeling_rankwise.py defines them."""
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = [source_classes(config)[0].__name__]
    cfg["auto_map"] = dict(AUTO_MAP)
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n")  # JSON has no NaN
    with open(os.path.join(folder, "modeling_rankwise.py"), "w", encoding="utf-8") as f:
        f.write(modeling_source(config))


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


def load_rankwise_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        config=None, model_class: type | None = None, **hub_kwargs):
    """Rebuild a Rankwise checkpoint (local folder or hub id): `model_class` (default: the source
    architecture's causal LM with low-rank layers, `rankwise_class`) with empty weights, then the stored
    tensors. Every stored tensor must fill a parameter of the right shape, and every parameter must be filled:
    nothing is left randomly initialised."""
    from accelerate import init_empty_weights
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
    meta = getattr(config, RANKWISE_KEY, None)
    if not meta:
        raise CheckpointError(f"{path} is not a Rankwise checkpoint (config.json has no '{RANKWISE_KEY}' section)")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: rankwise format_version {meta['format_version']} is newer than this "
                              f"loader reads ({FORMAT_VERSION})")
    if model_class is None:
        model_class = rankwise_class("RankwiseForCausalLM", source_classes(config)[0], LowRankLinear)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = model_class(config)
    state = relative_to(model, _read_state_dict(path, **hub_kwargs))
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise CheckpointError(nonfinite_message(path, *bad))
    _check_shapes(path, model, state, relative_to(model, meta["modules"]))
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
    return model.eval()


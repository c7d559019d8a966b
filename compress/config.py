"""Validated settings of one compression job (the CLI and YAML runs build this; the pipeline reads it)."""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rankwise.compress.defaults import EORA_RANK_DEFAULT
from rankwise.compress.lowrank import INT4_GROUP_DEFAULT
from rankwise.compress.numerics import StoragePrice
from rankwise.compress.plugins import load_plugins
from rankwise.compress.stages.base import REGISTRIES
from rankwise.compress.stages.recipe import Recipe
from rankwise.errors import RankwiseError

DTYPES = ("auto", "fp32", "fp16", "bf16")

# Recommended pipelines by name: "best" measures best in bench/quality.py (bench/README.md, "Quality"); "fast"
# is the best of the pipelines without end-to-end training (block refinement instead: less time and
# less memory). Options given explicitly beside a preset override its values.
PRESETS: dict[str, dict] = {
    "best": {"method": "svd-llm", "ranks": "loss-aware", "kl_refine": True},
    "fast": {"method": "svd-llm", "ranks": "loss-aware", "refine": True},
}


# The options that are shorthand for recipe entries (`recipe` given, they must stay at their defaults).
SUGAR = ("method", "ranks", "fisher_sketch", "compensate", "eora_rank", "refit", "refit_damp", "refine",
         "refine_steps", "refine_lr", "kl_refine", "alpha", "rank_multiple", "keep_dense")


class RecipeEntry(BaseModel):
    """One stage of a recipe: a registered stage's name and its options."""
    model_config = ConfigDict(extra="forbid")

    stage: str
    options: dict[str, Any] = Field(default_factory=dict)


# What each budget's fraction measures, for the one-line refusal of a value outside (0, 1).
BUDGET_MEANINGS = {"ratio": "fraction of targeted parameters removed",
                   "size_ratio": "stored bytes kept, against 16 bits per weight"}


class CompressConfig(BaseModel):
    """One job's settings. The stages are the `recipe` (a list of {stage, options}); without one, it is
    expanded from the shorthand options (method, ranks, fisher_sketch, refit, compensate, refine, kl_refine and
    their settings)."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="hub id or local path of a causal LM")
    plugins: list[str] = Field(default_factory=list, description="modules (names or .py paths) that register "
                               "stages of their own, imported before the recipe is read")
    recipe: list[RecipeEntry] | None = Field(None, description="the stages, in order: [{stage, options}]")
    preset: Literal["none", "best", "fast"] = Field("none", description="a recommended pipeline; explicit options "
                                                    "override it")
    method: str = Field("svd-llm", description="factorization method")
    ratio: float | None = Field(None, description="fraction of the targeted Linear parameters removed, in (0, 1)")
    size_ratio: float | None = Field(None, description="instead of `ratio`: the stored bytes of the targeted "
                                     "Linears as a fraction of the same Linears at 16 bits per weight, in (0, 1)")
    ranks: str = Field("uniform", description="rank allocation")
    fisher_sketch: int = Field(0, ge=0, description="loss-aware ranks: rows of a Gaussian sketch of each Linear's "
                               "full output Fisher matrix that prices its truncation errors (0: the diagonal)")
    compensate: Literal["none", "eora"] = Field("none", description="residual low-rank path after truncation")
    eora_rank: int = Field(EORA_RANK_DEFAULT, ge=1, description="rank of the EoRA path (its parameters count in the ratio)")
    refit: bool = Field(False, description="re-solve B by least squares on the dense layer's outputs")
    refit_damp: float = Field(1.0, ge=0, description="ridge damping of refit / EoRA solves, relative (1.0: chosen on austen.txt)")
    refine: bool = Field(False, description="train each block's low-rank factors (Adam, MSE) to match the dense "
                         "block's outputs on the dense stream")
    refine_steps: int = Field(32, ge=1, description="refinement: optimizer steps per block (one calibration batch each)")
    refine_lr: float = Field(1e-3, gt=0, description="refinement: Adam's peak learning rate (cosine decay)")
    kl_refine: bool = Field(False, description="after the block walk, train every low-rank factor against the dense "
                            "model's next-token distribution (top-k KL, held-out windows decide)")
    calib: str = "wikitext2"
    nsamples: int = Field(256, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    bos: bool | None = Field(None, description="start every calibration window with BOS (None: as the tokenizer "
                             "does in normal use)")
    calib_chat: str | None = Field(None, description="conversations JSONL ({messages: [{role, content}]}) whose "
                                   "chat-templated windows are mixed into the calibration (None: the package's "
                                   "configs/chat/austen_chat.jsonl)")
    chat_fraction: float | None = Field(None, ge=0, lt=1, description="share of calibration windows from the "
                                        "conversations (None: 0.25 when the tokenizer has a chat template, else 0)")
    batch_size: int = Field(4, ge=1, description="calibration sequences per forward")
    alpha: float = Field(0.5, gt=0, description="ASVD exponent on mean |x|")
    rank_multiple: int = Field(1, ge=1)
    keep_dense: list[str] = Field(default_factory=list, description="Linears left dense (name or suffix, e.g. "
                                  "k_proj): the others make up the ratio")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    factor_dtype: Literal["auto", "bf16", "fp16", "fp32", "int8", "int4"] = Field(
        "auto", description="how the factors A and B are stored: auto (the model's dtype), a float dtype, int8 "
        "(one scale per output channel) or int4 (one scale per group of inputs)")
    int4_group: int = Field(INT4_GROUP_DEFAULT, ge=2, description="int4 factors: inputs per scale (even; it must "
                            "divide every rank and the hidden sizes)")
    device: str = "auto"
    offload: bool = Field(False, description="keep calibration activations and statistics on CPU")
    stream_weights: bool = Field(False, description="read each decoder block from the checkpoint's safetensors "
                                 "only when it is compressed (models larger than host memory)")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        """The preset's values under the options given explicitly (those present in the input)."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("ratio", "size_ratio")
    @classmethod
    def _budget_fraction(cls, v: float | None, info) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            meaning = BUDGET_MEANINGS[info.field_name]
            raise ValueError(f"{info.field_name.replace('_', ' ')} must be in (0, 1) ({meaning}), got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.ratio is None) == (self.size_ratio is None):
            raise ValueError("give exactly one budget: --ratio (parameters removed) or --size-ratio (bytes kept)")
        return self

    @property
    def budget_label(self) -> str:
        """The budget in a few characters: the ratio, or "size" and the size ratio."""
        return f"{self.ratio:g}" if self.ratio is not None else f"size {self.size_ratio:g}"

    @property
    def budget_ratio(self) -> float:
        """The fraction of the budget's unit removed: parameters (ratio), or 16-bit bytes (1 - size_ratio)."""
        return self.ratio if self.ratio is not None else 1.0 - self.size_ratio

    def storage_price(self) -> StoragePrice | None:
        """How a byte budget prices the factors (None: the budget counts parameters)."""
        return None if self.size_ratio is None else StoragePrice.of(self.factor_dtype, self.int4_group)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        from rankwise.compress.loading import DTYPE_ALIASES
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _check_recipe(self):
        """Plugins imported, then the recipe built once: an unknown stage or a bad option is one line here,
        before any work."""
        try:
            load_plugins(self.plugins)
            if self.recipe is not None:
                default = {k: f.default_factory() if f.default_factory else f.default
                           for k, f in type(self).model_fields.items() if k in SUGAR}
                given = [k for k in SUGAR if getattr(self, k) != default[k]]
                if given or self.preset != "none":
                    what = f"--{given[0].replace('_', '-')}" if given else f"preset {self.preset!r}"
                    raise RankwiseError(f"{what} is shorthand for recipe stages: give it inside the recipe instead")
            else:
                for option, kind in (("method", "factorizer"), ("ranks", "allocator")):
                    name, registry = getattr(self, option), REGISTRIES[kind]
                    if name not in registry:
                        raise RankwiseError(f"unknown --{option} {name!r}: choose one of {', '.join(sorted(registry))}"
                                            f" (one of your own: --plugin MODULE)")
                if self.fisher_sketch and "output-fisher" not in REGISTRIES["allocator"][self.ranks].model_passes:
                    raise RankwiseError(f"--fisher-sketch prices the output Fisher of --ranks loss-aware; --ranks "
                                        f"{self.ranks} does not use it")
            Recipe.from_config(self)
        except RankwiseError as e:
            raise ValueError(str(e)) from None
        return self

    def stages(self) -> list[dict]:
        """The recipe entries: `recipe` as given, or the ones the shorthand options stand for."""
        if self.recipe is not None:
            return [e.model_dump() for e in self.recipe]
        multiple = self.rank_multiple
        if self.factor_dtype == "int4":  # int4 groups run along B's inputs: every rank a multiple of the group
            multiple = math.lcm(multiple, self.int4_group)
        entries = [{"stage": "output-fisher", "options": {"sketch": self.fisher_sketch, "seed": self.seed}}
                   ] if self.fisher_sketch else []
        entries += [{"stage": self.method, "options": {"alpha": self.alpha} if self.method == "asvd" else {}},
                   {"stage": self.ranks, "options": {"rank_multiple": multiple,
                                                     "keep_dense": list(self.keep_dense)}}]
        if self.refit:
            entries.append({"stage": "refit", "options": {"damp": self.refit_damp}})
        if self.compensate == "eora":
            entries.append({"stage": "eora", "options": {"rank": self.eora_rank, "damp": self.refit_damp}})
        if self.refine:
            entries.append({"stage": "block-refine", "options": {"steps": self.refine_steps, "lr": self.refine_lr,
                                                                 "seed": self.seed}})
        if self.kl_refine:
            entries.append({"stage": "kl-refine", "options": {"seed": self.seed}})
        return entries

    def with_stages(self, added: list[dict]) -> "CompressConfig":
        """These settings with stages appended to their recipe (the shorthand options become the recipe)."""
        keep = self.model_dump(exclude={*SUGAR, "recipe", "preset"})
        return CompressConfig(**keep, recipe=[*self.stages(), *added])

    def name_parts(self) -> list[str]:
        """Short parts of a job's name from its recipe: the factorizer, the ratio, then every other stage that
        is not the default uniform allocation, as its label in slug form (e.g. loss-aware-ranks, eora-rank-4), the
        Linears the allocator keeps dense and the preset."""
        recipe = Recipe.from_config(self)
        parts = [_slug(recipe.factorizer.label()), _slug(self.budget_label)]
        for stage in recipe.stages[1:]:
            label = stage.label()
            if label != "uniform ranks":
                parts.append(_slug(label))
        dense = recipe.allocator.options.keep_dense
        return (parts + (["dense-" + "+".join(_slug(k) for k in dense)] if dense else [])
                + ([f"preset-{self.preset}"] if self.preset != "none" else []))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()

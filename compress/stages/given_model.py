"""The stages of `compress compensate`, which take a model compressed elsewhere as it is: the factorizer
`given-factors` replaces every Linear by the compressed model's layer of the same name (a low-rank layer, or
any dense-weight layer: pruned, for instance), and the allocator `given-ranks` picks the layers that differ
from the original (their ranks, or full rank for a dense one). With the corrector `eora` after them, the
pipeline fits EoRA paths to what that compression left out, like any recipe. Both read the compressed model
object they are built with (`compress.compensate`)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from rankwise.compress.arch import dense_weight
from rankwise.compress.lowrank import LoraLinear, LowRankLinear
from rankwise.compress.methods.base import Method, register
from rankwise.compress.stages.base import Allocator, StageOptions, StageRecord, register_allocator
from rankwise.errors import RankwiseError


def given_layer(model: nn.Module | None, name: str, shape) -> nn.Module:
    """The compressed model's layer `name`: present, of the original's shape, without a compensation path."""
    if model is None:
        raise RankwiseError("given-factors and given-ranks take their layers from `compress compensate`")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise RankwiseError(f"the compressed model has no layer {name!r} (layer names must match the original)")
    if isinstance(layer, LoraLinear) or (isinstance(layer, LowRankLinear) and layer.lora_rank):
        raise RankwiseError(f"layer {name!r} of the compressed model already has a compensation path")
    found = tuple(dense_weight(layer).shape)
    if found != tuple(shape):
        raise RankwiseError(f"layer {name!r}: shape {found} in the compressed model, {tuple(shape)} in the original")
    return layer


class GivenOptions(StageOptions):
    checkpoint: str = Field("", description="the compressed model the layers come from")


class GivenRecord(StageRecord):
    low_rank: int = 0   # low-rank layers taken with their own factors
    dense: int = 0      # other layers taken as they are


@register("given-factors")
class GivenFactors(Method):
    Options = GivenOptions
    Record = GivenRecord

    def __init__(self, options=None, model: nn.Module | None = None, **values):
        super().__init__(options, **values)
        self.model = model

    def label(self) -> str:
        return f"layers of {self.options.checkpoint}" if self.options.checkpoint else "given layers"

    def factorize(self, work):
        layer = given_layer(self.model, work.name, work.weight.shape).to(work.weight.device)
        if isinstance(layer, LowRankLinear):
            self.record.low_rank += 1
        else:
            self.record.dense += 1
        work.module = layer   # replaces the Linear as it is; a path goes beside it
        return None, None


@register_allocator("given-ranks")
class GivenRanks(Allocator):
    fixed_ranks = True

    def __init__(self, options=None, model: nn.Module | None = None, **values):
        super().__init__(options, **values)
        self.model = model

    def label(self) -> str:
        return "given ranks"

    def allocate(self, job, ratio):
        """The compressed layer's rank; full rank for a changed dense one; None (untouched) where the layer is
        the original's."""
        ranks = {}
        for name, shape in job.shapes.items():
            original = dense_weight(job.model.get_submodule(name)).detach()
            layer = given_layer(self.model, name, original.shape)
            if isinstance(layer, LowRankLinear):
                ranks[name] = layer.rank
            elif torch.equal(dense_weight(layer).detach().to(original), original):
                ranks[name] = None   # identical layer: nothing to compensate
            else:
                ranks[name] = min(shape.out, shape.inp)
        return ranks
